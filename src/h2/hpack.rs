//! HPACK (RFC 7541), the header compression of HTTP/2: the decoder for the header
//! blocks clients send, with its dynamic table, and the encoder for the heads the
//! gateway sends.
//!
//! The decoder allocates nothing per field once its buffers have grown: literal
//! strings are handed on as slices of the block, Huffman-coded ones are decoded into
//! two buffers the decoder keeps (a name and a value may both be coded), and the
//! dynamic table keeps its entries' bytes in one buffer that is compacted, not
//! reallocated, as old entries are evicted.
//!
//! The encoder sends literals without Huffman coding (`encode_field`), and with
//! [`Encoder`] puts a few fields that repeat from response to response in the peer's
//! table once, naming them by index after that; it never evicts.

use std::collections::VecDeque;
use std::fmt;

use super::huffman;

/// Any decoding error: the connection must end with COMPRESSION_ERROR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The block ends inside a representation.
    Truncated,
    /// An integer with more than 4 continuation bytes (no length, index or table size
    /// in a header block needs that many).
    Integer,
    /// Index 0, or an index past the end of the dynamic table.
    Index,
    /// A Huffman-coded string holding EOS or ending with invalid padding.
    Huffman,
    /// A dynamic table size update after a field, or above the advertised limit.
    SizeUpdate,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::Truncated => "truncated header block",
            Error::Integer => "integer too large",
            Error::Index => "invalid table index",
            Error::Huffman => "invalid huffman string",
            Error::SizeUpdate => "invalid table size update",
        })
    }
}

/// The static table (RFC 7541, Appendix A); index 1 is the first entry.
static STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// The size an entry counts for against the table's limit (RFC 7541, 4.1).
const ENTRY_OVERHEAD: usize = 32;

/// Where a dynamic table entry's bytes are in `Table::bytes`: the name, then the value.
#[derive(Clone, Copy)]
struct Entry {
    start: usize,
    name_len: usize,
    value_len: usize,
}

impl Entry {
    fn size(self) -> usize {
        self.name_len + self.value_len + ENTRY_OVERHEAD
    }

    fn end(self) -> usize {
        self.start + self.name_len + self.value_len
    }
}

/// The name of a field to be added to the dynamic table.
enum Name<'a> {
    Bytes(&'a [u8]),
    /// The name of this entry, which may be evicted by the insertion itself.
    Entry(Entry),
}

/// The dynamic table.
struct Table {
    /// The entries' bytes, oldest first, after `dead` bytes of evicted entries. The
    /// dead bytes are dropped (the live ones moved to the front) when an insertion
    /// would otherwise grow the buffer.
    bytes: Vec<u8>,
    dead: usize,
    /// Newest first: index 62 is `entries[0]`.
    entries: VecDeque<Entry>,
    /// The sum of the entries' sizes, at most `capacity`.
    size: usize,
    /// The current maximum size, as last set by a size update.
    capacity: usize,
}

impl Table {
    fn new(capacity: usize) -> Table {
        Table {
            bytes: Vec::new(),
            dead: 0,
            entries: VecDeque::new(),
            size: 0,
            capacity,
        }
    }

    fn name(&self, e: Entry) -> &[u8] {
        &self.bytes[e.start..e.start + e.name_len]
    }

    fn field(&self, e: Entry) -> (&[u8], &[u8]) {
        self.bytes[e.start..e.end()].split_at(e.name_len)
    }

    fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.evict();
    }

    /// Adds a field as the newest entry, evicting the oldest ones to make room; a
    /// field larger than the whole table leaves the table empty.
    fn insert(&mut self, name: Name<'_>, value: &[u8]) {
        let name_len = match name {
            Name::Bytes(n) => n.len(),
            Name::Entry(e) => e.name_len,
        };
        let size = name_len + value.len() + ENTRY_OVERHEAD;
        if size > self.capacity {
            self.clear();
            return;
        }
        // The new entry goes in before the old ones leave, as its name may be theirs.
        let mut shift = 0;
        if self.dead > 0 && self.bytes.len() + name_len + value.len() > self.bytes.capacity() {
            shift = self.compact();
        }
        let start = self.bytes.len();
        match name {
            Name::Bytes(n) => self.bytes.extend_from_slice(n),
            Name::Entry(e) => {
                let from = e.start - shift;
                self.bytes.extend_from_within(from..from + e.name_len);
            }
        }
        self.bytes.extend_from_slice(value);
        self.entries.push_front(Entry {
            start,
            name_len,
            value_len: value.len(),
        });
        self.size += size;
        self.evict();
    }

    /// Drops the oldest entries until the table fits its capacity.
    fn evict(&mut self) {
        while self.size > self.capacity {
            let Some(oldest) = self.entries.pop_back() else {
                break;
            };
            self.size -= oldest.size();
            self.dead = oldest.end();
        }
        if self.entries.is_empty() {
            self.clear();
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes.clear();
        self.dead = 0;
        self.size = 0;
    }

    /// Moves the live bytes to the front of the buffer; returns by how much.
    fn compact(&mut self) -> usize {
        let shift = self.dead;
        self.bytes.drain(..shift);
        for e in &mut self.entries {
            e.start -= shift;
        }
        self.dead = 0;
        shift
    }
}

/// The decoding side of one connection: the dynamic table the client's encoder
/// fills, and the buffers for Huffman-coded strings.
pub struct Decoder {
    max_size: usize,
    table: Table,
    name_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

impl Decoder {
    /// `max_size`: the SETTINGS_HEADER_TABLE_SIZE this endpoint advertised (the limit a
    /// dynamic table size update may not exceed). The table starts at that size.
    pub fn new(max_size: usize) -> Decoder {
        Decoder {
            max_size,
            table: Table::new(max_size),
            name_buf: Vec::new(),
            value_buf: Vec::new(),
        }
    }

    /// Decodes one complete header block (a HEADERS frame's fragment joined with its
    /// CONTINUATIONs), calling `field(name, value)` for every field in order. Names
    /// and values are passed exactly as decoded (no validation of case or characters;
    /// the caller does that). The dynamic table is updated for the whole block; on
    /// `Err` the connection is unusable (the caller sends GOAWAY with
    /// COMPRESSION_ERROR).
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), Error> {
        let mut rest = block;
        // No field yet: size updates are allowed.
        let mut at_start = true;
        while let Some(&first) = rest.first() {
            if first & 0x80 != 0 {
                // Indexed field (6.1).
                let index = integer(&mut rest, 7)?;
                let (name, value) = self.indexed(index)?;
                field(name, value);
            } else if first & 0x20 != 0 && first & 0x40 == 0 {
                // Dynamic table size update (6.3).
                if !at_start {
                    return Err(Error::SizeUpdate);
                }
                let size = integer(&mut rest, 5)?;
                if size > self.max_size {
                    return Err(Error::SizeUpdate);
                }
                self.table.set_capacity(size);
                continue;
            } else {
                // Literal field: with incremental indexing (6.2.1, 01 and a 6-bit
                // prefix), without indexing (6.2.2, 0000) or never indexed (6.2.3, 0001).
                let indexing = first & 0x40 != 0;
                let index = integer(&mut rest, if indexing { 6 } else { 4 })?;
                let name = match index {
                    0 => Name::Bytes(string(&mut rest, &mut self.name_buf)?),
                    1..=61 => Name::Bytes(STATIC[index - 1].0),
                    _ => Name::Entry(*self.table.entries.get(index - 62).ok_or(Error::Index)?),
                };
                let value = string(&mut rest, &mut self.value_buf)?;
                match name {
                    Name::Bytes(n) => field(n, value),
                    Name::Entry(e) => field(self.table.name(e), value),
                }
                if indexing {
                    self.table.insert(name, value);
                }
            }
            at_start = false;
        }
        Ok(())
    }

    /// The field at `index` of the static and dynamic tables.
    fn indexed(&self, index: usize) -> Result<(&[u8], &[u8]), Error> {
        match index {
            0 => Err(Error::Index),
            1..=61 => Ok(STATIC[index - 1]),
            _ => match self.table.entries.get(index - 62) {
                Some(&e) => Ok(self.table.field(e)),
                None => Err(Error::Index),
            },
        }
    }
}

/// Reads an integer with an `n`-bit prefix (5.1) off the front of `src`. Values need
/// at most 4 continuation bytes (under 2^28 + 2^n), which is more than any length,
/// index or table size a header block can hold.
fn integer(src: &mut &[u8], n: u32) -> Result<usize, Error> {
    let mask = (1 << n) - 1;
    let (&first, mut rest) = src.split_first().ok_or(Error::Truncated)?;
    let mut value = usize::from(first) & mask;
    if value == mask {
        let mut shift = 0;
        loop {
            let (&b, r) = rest.split_first().ok_or(Error::Truncated)?;
            rest = r;
            value += usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 21 {
                return Err(Error::Integer);
            }
        }
    }
    *src = rest;
    Ok(value)
}

/// Reads a string literal (5.2) off the front of `src`: a slice of `src` when it is
/// sent as is, else its Huffman decoding in `scratch`.
fn string<'b, 's, 'r>(src: &mut &'b [u8], scratch: &'s mut Vec<u8>) -> Result<&'r [u8], Error>
where
    'b: 'r,
    's: 'r,
{
    let huffman = src.first().is_some_and(|&b| b & 0x80 != 0);
    let len = integer(src, 7)?;
    if len > src.len() {
        return Err(Error::Truncated);
    }
    let (raw, rest) = src.split_at(len);
    *src = rest;
    if !huffman {
        return Ok(raw);
    }
    scratch.clear();
    if huffman::decode(raw, scratch) {
        Ok(scratch.as_slice())
    } else {
        Err(Error::Huffman)
    }
}

/// Writes `value` with an `n`-bit prefix (5.1), the first byte's other bits `flags`.
fn encode_integer(value: usize, n: u32, flags: u8, dst: &mut Vec<u8>) {
    let mask = (1 << n) - 1;
    if value < mask {
        dst.push(flags | value as u8);
        return;
    }
    dst.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        dst.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    dst.push(rest as u8);
}

/// Writes `s` as a string literal sent as is (no Huffman coding).
fn encode_string(s: &[u8], dst: &mut Vec<u8>) {
    encode_integer(s.len(), 7, 0, dst);
    dst.extend_from_slice(s);
}

/// The first static table index with the name `name`.
fn static_name_index(name: &str) -> Option<usize> {
    Some(match name {
        ":authority" => 1,
        ":method" => 2,
        ":path" => 4,
        ":scheme" => 6,
        ":status" => 8,
        "accept-charset" => 15,
        "accept-encoding" => 16,
        "accept-language" => 17,
        "accept-ranges" => 18,
        "accept" => 19,
        "access-control-allow-origin" => 20,
        "age" => 21,
        "allow" => 22,
        "authorization" => 23,
        "cache-control" => 24,
        "content-disposition" => 25,
        "content-encoding" => 26,
        "content-language" => 27,
        "content-length" => 28,
        "content-location" => 29,
        "content-range" => 30,
        "content-type" => 31,
        "cookie" => 32,
        "date" => 33,
        "etag" => 34,
        "expect" => 35,
        "expires" => 36,
        "from" => 37,
        "host" => 38,
        "if-match" => 39,
        "if-modified-since" => 40,
        "if-none-match" => 41,
        "if-range" => 42,
        "if-unmodified-since" => 43,
        "last-modified" => 44,
        "link" => 45,
        "location" => 46,
        "max-forwards" => 47,
        "proxy-authenticate" => 48,
        "proxy-authorization" => 49,
        "range" => 50,
        "referer" => 51,
        "refresh" => 52,
        "retry-after" => 53,
        "server" => 54,
        "set-cookie" => 55,
        "strict-transport-security" => 56,
        "transfer-encoding" => 57,
        "user-agent" => 58,
        "vary" => 59,
        "via" => 60,
        "www-authenticate" => 61,
        _ => return None,
    })
}

/// Writes a dynamic table size update (6.3), which tells the peer's decoder the size
/// of the table this encoder uses (0: none).
pub fn encode_size_update(size: usize, dst: &mut Vec<u8>) {
    encode_integer(size, 5, 0x20, dst);
}

/// Writes `:status`: fully indexed for 200, 204, 206, 304, 400, 404 and 500 (static
/// table 8–14), else a literal without indexing with name index 8 and the digits.
pub fn encode_status(status: u16, dst: &mut Vec<u8>) {
    let index = match status {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => {
            dst.push(8);
            let mut digits = itoa::Buffer::new();
            encode_string(digits.format(status).as_bytes(), dst);
            return;
        }
    };
    dst.push(0x80 | index);
}

/// Writes a field as a literal the peer does not index: "never indexed" (6.2.3) when
/// `never_indexed`, which intermediaries must keep, else "without indexing" (6.2.2).
/// The name is a static table index when the static table has it; the value is sent
/// as is.
///
/// `name` is lowercase (an `http::HeaderName`'s `as_str()`).
pub fn encode_field(name: &str, value: &[u8], never_indexed: bool, dst: &mut Vec<u8>) {
    let flags = if never_indexed { 0x10 } else { 0x00 };
    match static_name_index(name) {
        Some(index) => encode_integer(index, 4, flags, dst),
        None => {
            dst.push(flags);
            encode_string(name.as_bytes(), dst);
        }
    }
    encode_string(value, dst);
}

/// This server's use of its peer's dynamic table: a response field that repeats from
/// one response to the next (`server`, `content-type`, `ratelimit-policy`, …) is
/// inserted the first time and named by index after that, and the names of the
/// gateway's own per-response headers (`x-request-id`, `RateLimit`) enter with their
/// first value so that later never-indexed values can name them by index. Nothing is
/// ever evicted: when the table is full, fields go as literals. What is inserted is
/// mirrored here, so finding an entry is a scan over a few of them, with no hashing.
pub struct Encoder {
    /// Inserted fields, oldest first.
    entries: Vec<Inserted>,
    size: usize,
    /// The table size in force: 4096 until the peer allows less.
    max: usize,
    /// Owed at the start of the next header block: empty the table, then this size.
    update: Option<usize>,
}

/// A field this encoder inserted: name, value.
type Inserted = (Box<[u8]>, Box<[u8]>);

/// HPACK's default table size, the most this encoder uses.
const DEFAULT_TABLE: usize = 4096;
/// Longer values are never inserted.
const MAX_INSERTED_VALUE: usize = 128;

/// Response fields whose values tend to repeat on a connection.
fn repeats(name: &str) -> bool {
    matches!(
        name,
        "server"
            | "content-type"
            | "ratelimit-policy"
            | "cache-control"
            | "vary"
            | "content-encoding"
            | "access-control-allow-origin"
            | "x-content-type-options"
            | "strict-transport-security"
    )
}

/// The gateway's own headers whose values differ in every response.
fn own_unique(name: &str) -> bool {
    matches!(name, "x-request-id" | "ratelimit")
}

impl Default for Encoder {
    fn default() -> Encoder {
        Encoder {
            entries: Vec::new(),
            size: 0,
            max: DEFAULT_TABLE,
            update: None,
        }
    }
}

impl Encoder {
    /// The peer's SETTINGS_HEADER_TABLE_SIZE. Below the size in force, the table is
    /// emptied and the next header block starts with the two size updates that say so.
    pub fn set_max(&mut self, size: usize) {
        if size >= self.max {
            return;
        }
        self.entries.clear();
        self.size = 0;
        self.max = size;
        self.update = Some(size);
    }

    /// Starts a header block: the size updates owed, if any.
    pub fn begin(&mut self, dst: &mut Vec<u8>) {
        if let Some(size) = self.update.take() {
            encode_size_update(0, dst);
            encode_size_update(size, dst);
        }
    }

    /// The dynamic index of the newest entry named `name` (with `value`, when given).
    fn find(&self, name: &[u8], value: Option<&[u8]>) -> Option<usize> {
        let n = self.entries.len();
        self.entries
            .iter()
            .rposition(|(en, ev)| **en == *name && value.is_none_or(|v| **ev == *v))
            .map(|k| 62 + (n - 1 - k))
    }

    fn insert(&mut self, name: &str, value: &[u8], dst: &mut Vec<u8>) -> bool {
        let size = name.len() + value.len() + 32;
        if value.len() > MAX_INSERTED_VALUE || self.size + size > self.max {
            return false;
        }
        match static_name_index(name) {
            Some(index) => encode_integer(index, 6, 0x40, dst),
            None => {
                dst.push(0x40);
                encode_string(name.as_bytes(), dst);
            }
        }
        encode_string(value, dst);
        self.entries.push((name.as_bytes().into(), value.into()));
        self.size += size;
        true
    }

    /// Writes one field (`name` lowercase): by index when the table has it, inserted
    /// when it is one that repeats and fits, else a literal (never indexed when
    /// `never_indexed`), its name by index where either table has it.
    pub fn field(&mut self, name: &str, value: &[u8], never_indexed: bool, dst: &mut Vec<u8>) {
        let (repeats, unique) = (repeats(name), own_unique(name));
        if !repeats && !unique {
            return encode_field(name, value, never_indexed, dst);
        }
        if repeats && !never_indexed {
            if let Some(index) = self.find(name.as_bytes(), Some(value)) {
                return encode_integer(index, 7, 0x80, dst);
            }
            if self.insert(name, value, dst) {
                return;
            }
            return encode_field(name, value, never_indexed, dst);
        }
        match self.find(name.as_bytes(), None) {
            Some(index) => {
                encode_integer(index, 4, if never_indexed { 0x10 } else { 0 }, dst);
                encode_string(value, dst);
            }
            None if unique && self.insert(name, value, dst) => {}
            None => encode_field(name, value, never_indexed, dst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::huffman::CODES;
    use super::*;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|d| u8::from_str_radix(std::str::from_utf8(d).unwrap(), 16).unwrap())
            .collect()
    }

    fn decode(dec: &mut Decoder, block: &[u8]) -> Result<Fields, Error> {
        let mut fields = Vec::new();
        dec.decode(block, |n, v| fields.push((n.to_vec(), v.to_vec())))?;
        Ok(fields)
    }

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    /// The dynamic table, newest first.
    fn table(dec: &Decoder) -> Fields {
        dec.table
            .entries
            .iter()
            .map(|&e| {
                let (n, v) = dec.table.field(e);
                (n.to_vec(), v.to_vec())
            })
            .collect()
    }

    /// Decodes `block` and checks the fields, the table (newest first) and its size.
    fn check(
        dec: &mut Decoder,
        block: &str,
        want: &[(&str, &str)],
        entries: &[(&str, &str)],
        size: usize,
    ) {
        assert_eq!(decode(dec, &hex(block)).unwrap(), fields(want));
        assert_eq!(table(dec), fields(entries));
        assert_eq!(dec.table.size, size);
    }

    #[test]
    fn rfc_c2_literal_and_indexed_fields() {
        let mut dec = Decoder::new(4096);
        let custom = [("custom-key", "custom-header")];
        check(
            &mut dec,
            "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
            &custom,
            &custom,
            55,
        );
        let mut dec = Decoder::new(4096);
        check(
            &mut dec,
            "040c 2f73 616d 706c 652f 7061 7468",
            &[(":path", "/sample/path")],
            &[],
            0,
        );
        let mut dec = Decoder::new(4096);
        check(
            &mut dec,
            "1008 7061 7373 776f 7264 0673 6563 7265 74",
            &[("password", "secret")],
            &[],
            0,
        );
        let mut dec = Decoder::new(4096);
        check(&mut dec, "82", &[(":method", "GET")], &[], 0);
    }

    const REQUEST_1: [(&str, &str); 4] = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    const REQUEST_2: [(&str, &str); 5] = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
        ("cache-control", "no-cache"),
    ];
    const REQUEST_3: [(&str, &str); 5] = [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];
    const REQUEST_TABLES: [&[(&str, &str)]; 3] = [
        &[(":authority", "www.example.com")],
        &[
            ("cache-control", "no-cache"),
            (":authority", "www.example.com"),
        ],
        &[
            ("custom-key", "custom-value"),
            ("cache-control", "no-cache"),
            (":authority", "www.example.com"),
        ],
    ];

    fn requests(blocks: [&str; 3]) {
        let mut dec = Decoder::new(4096);
        let want: [&[(&str, &str)]; 3] = [&REQUEST_1, &REQUEST_2, &REQUEST_3];
        let sizes = [57, 110, 164];
        for i in 0..3 {
            check(&mut dec, blocks[i], want[i], REQUEST_TABLES[i], sizes[i]);
        }
    }

    #[test]
    fn rfc_c3_requests_without_huffman() {
        requests([
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        ]);
    }

    #[test]
    fn rfc_c4_requests_with_huffman() {
        requests([
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ]);
    }

    const DATE_1: &str = "Mon, 21 Oct 2013 20:13:21 GMT";
    const DATE_2: &str = "Mon, 21 Oct 2013 20:13:22 GMT";
    const LOCATION: &str = "https://www.example.com";
    const COOKIE: &str = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";

    fn responses(blocks: [&str; 3]) {
        let mut dec = Decoder::new(256);
        check(
            &mut dec,
            blocks[0],
            &[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", DATE_1),
                ("location", LOCATION),
            ],
            &[
                ("location", LOCATION),
                ("date", DATE_1),
                ("cache-control", "private"),
                (":status", "302"),
            ],
            222,
        );
        check(
            &mut dec,
            blocks[1],
            &[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", DATE_1),
                ("location", LOCATION),
            ],
            &[
                (":status", "307"),
                ("location", LOCATION),
                ("date", DATE_1),
                ("cache-control", "private"),
            ],
            222,
        );
        check(
            &mut dec,
            blocks[2],
            &[
                (":status", "200"),
                ("cache-control", "private"),
                ("date", DATE_2),
                ("location", LOCATION),
                ("content-encoding", "gzip"),
                ("set-cookie", COOKIE),
            ],
            &[
                ("set-cookie", COOKIE),
                ("content-encoding", "gzip"),
                ("date", DATE_2),
            ],
            215,
        );
    }

    #[test]
    fn rfc_c5_responses_without_huffman() {
        responses([
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
             2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
             6c65 2e63 6f6d",
            "4803 3330 37c1 c0bf",
            "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
             54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
             5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
             3d31",
        ]);
    }

    #[test]
    fn rfc_c6_responses_with_huffman() {
        responses([
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
             2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            "4883 640e ffc1 c0bf",
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
             77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
             9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        ]);
    }

    #[test]
    fn size_updates() {
        let mut dec = Decoder::new(4096);
        decode(
            &mut dec,
            &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"),
        )
        .unwrap();
        assert_eq!(dec.table.size, 55);
        // Two updates at the start of a block: to 0 (the table empties), then back up.
        let mut block = Vec::new();
        encode_size_update(0, &mut block);
        encode_size_update(4096, &mut block);
        assert_eq!(block, [0x20, 0x3f, 0xe1, 0x1f]);
        block.push(0x82);
        assert_eq!(
            decode(&mut dec, &block).unwrap(),
            fields(&[(":method", "GET")])
        );
        assert_eq!((dec.table.size, dec.table.capacity), (0, 4096));
        // An update alone is a valid block.
        assert_eq!(decode(&mut dec, &[0x3f, 0xe1, 0x1f]).unwrap(), fields(&[]));
        // Shrinking evicts the oldest entries.
        decode(&mut dec, &hex("4001 61 01 62 4001 63 01 64")).unwrap();
        assert_eq!(table(&dec), fields(&[("c", "d"), ("a", "b")]));
        decode(&mut dec, &[0x3f, 0x03]).unwrap();
        assert_eq!(table(&dec), fields(&[("c", "d")]));
        assert_eq!(dec.table.size, 34);
        assert_eq!(decode(&mut dec, &[0xbe]).unwrap(), fields(&[("c", "d")]));
        assert_eq!(decode(&mut dec, &[0xbf]), Err(Error::Index));
    }

    #[test]
    fn entry_larger_than_the_table_empties_it() {
        let mut dec = Decoder::new(64);
        decode(&mut dec, &hex("4001 61 01 62")).unwrap();
        assert_eq!(dec.table.size, 34);
        let mut block = vec![0x40, 0x01, b'x', 0x20];
        block.extend_from_slice(&[b'y'; 32]);
        let got = decode(&mut dec, &block).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.as_slice(), got[0].1.len()), (&b"x"[..], 32));
        assert!(table(&dec).is_empty());
        assert_eq!(dec.table.size, 0);
    }

    /// A new entry may take its name from the entry its insertion evicts (RFC 7541, 4.4).
    #[test]
    fn name_of_an_evicted_entry() {
        let mut dec = Decoder::new(40);
        decode(&mut dec, &hex("4003 6b65 79 01 61")).unwrap();
        // Name index 62 (the entry itself), new value.
        let got = decode(&mut dec, &hex("7e01 62")).unwrap();
        assert_eq!(got, fields(&[("key", "b")]));
        assert_eq!(table(&dec), fields(&[("key", "b")]));
        // Many rounds through a table that holds a few entries: the buffer is compacted
        // and entries still read back right.
        let mut dec = Decoder::new(200);
        for i in 0..1000u32 {
            let value = format!("value-{i}");
            let mut block = vec![0x40, 0x04];
            block.extend_from_slice(b"name");
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
            block.extend_from_slice(&[0x7e, 0x01, b'!']);
            let got = decode(&mut dec, &block).unwrap();
            assert_eq!(got, fields(&[("name", &value), ("name", "!")]));
            assert_eq!(
                decode(&mut dec, &[0xbf]).unwrap(),
                fields(&[("name", &value)])
            );
            assert!(dec.table.size <= 200);
            assert!(dec.table.bytes.capacity() <= 512);
        }
    }

    #[test]
    fn errors() {
        let cases: &[(&str, &[u8], Error)] = &[
            ("empty index", &[0x80], Error::Index),
            ("static index beyond the table", &[0xbe], Error::Index),
            (
                "name index beyond the table",
                &[0x7e, 0x01, b'a'],
                Error::Index,
            ),
            (
                "name index 70, never indexed",
                &[0x1f, 0x37, 0x01, b'a'],
                Error::Index,
            ),
            ("truncated integer", &[0xff], Error::Truncated),
            (
                "truncated integer continuation",
                &[0xff, 0x80],
                Error::Truncated,
            ),
            (
                "integer overflow",
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0x0f],
                Error::Integer,
            ),
            (
                "integer with padding bytes",
                &[0xff, 0x80, 0x80, 0x80, 0x80, 0x00],
                Error::Integer,
            ),
            ("name missing", &[0x40], Error::Truncated),
            ("value missing", &[0x40, 0x01, b'a'], Error::Truncated),
            (
                "string beyond the block",
                &[0x00, 0x05, b'a'],
                Error::Truncated,
            ),
            (
                "huge string length",
                &[0x00, 0x7f, 0xff, 0xff, 0xff, 0x7f],
                Error::Truncated,
            ),
            (
                "huffman EOS",
                &[0x00, 0x01, b'a', 0x84, 0xff, 0xff, 0xff, 0xff],
                Error::Huffman,
            ),
            (
                "huffman EOS mid-string",
                &[0x00, 0x81, 0x1f, 0x85, 0x1f, 0xff, 0xff, 0xff, 0xff],
                Error::Huffman,
            ),
            (
                "huffman padding of 8 bits",
                &[0x00, 0x01, b'a', 0x81, 0xff],
                Error::Huffman,
            ),
            (
                "huffman padding of 11 bits",
                &[0x00, 0x01, b'a', 0x82, 0x1f, 0xff],
                Error::Huffman,
            ),
            (
                "huffman padding with a 0",
                &[0x00, 0x01, b'a', 0x81, 0x1e],
                Error::Huffman,
            ),
            (
                "huffman padding of zeros",
                &[0x00, 0x01, b'a', 0x81, 0x18],
                Error::Huffman,
            ),
            (
                "huffman name",
                &[0x00, 0x81, 0x00, 0x01, b'a'],
                Error::Huffman,
            ),
            (
                "size update above max",
                &[0x3f, 0xe2, 0x1f],
                Error::SizeUpdate,
            ),
            (
                "size update after a field",
                &[0x82, 0x20],
                Error::SizeUpdate,
            ),
            ("truncated size update", &[0x3f], Error::Truncated),
        ];
        for &(what, block, error) in cases {
            let mut dec = Decoder::new(4096);
            assert_eq!(decode(&mut dec, block), Err(error), "{what}");
        }
        // The valid neighbours of some of these.
        let mut dec = Decoder::new(4096);
        assert_eq!(
            decode(&mut dec, &[0x00, 0x01, b'a', 0x81, 0x1f]).unwrap(),
            fields(&[("a", "a")])
        );
        assert_eq!(decode(&mut dec, &[0x3f, 0xe1, 0x1f]).unwrap(), fields(&[]));
        assert_eq!(
            decode(&mut dec, &[0x00, 0x01, b'a', 0x80]).unwrap(),
            fields(&[("a", "")])
        );
        assert_eq!(Error::Huffman.to_string(), "invalid huffman string");
    }

    fn huffman_encode(src: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u64, 0u32);
        for &b in src {
            let (code, len) = CODES[usize::from(b)];
            acc = (acc << len) | u64::from(code);
            bits += u32::from(len);
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
            acc &= (1 << bits) - 1;
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) | (0xff >> bits)) as u8);
        }
        out
    }

    /// A literal field without indexing, name and value Huffman-coded.
    fn huffman_field(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut block = vec![0x00];
        for s in [name, value] {
            let coded = huffman_encode(s);
            encode_integer(coded.len(), 7, 0x80, &mut block);
            block.extend_from_slice(&coded);
        }
        block
    }

    #[test]
    fn huffman_round_trip() {
        let all: Vec<u8> = (0..=255).collect();
        let mut strings: Vec<Vec<u8>> = vec![
            all.clone(),
            all.iter().rev().copied().collect(),
            Vec::new(),
            vec![b'a'; 1000],
            vec![0xff; 300],
            vec![0; 77],
            b"www.example.com".to_vec(),
        ];
        strings.extend((0..=255).map(|b| vec![b]));
        strings.extend((0..=255u8).map(|b| vec![b, b.wrapping_mul(7), b ^ 0x55]));
        let mut dec = Decoder::new(4096);
        for (i, s) in strings.iter().enumerate() {
            let name = &strings[(i + 1) % strings.len()];
            let got = decode(&mut dec, &huffman_field(name, s)).unwrap();
            assert_eq!(got, vec![(name.clone(), s.clone())]);
        }
        // The same with indexing: the table copies the decoded strings.
        let block: Vec<u8> = [0x40]
            .into_iter()
            .chain(huffman_field(b"k", &all)[1..].iter().copied())
            .collect();
        decode(&mut dec, &block).unwrap();
        assert_eq!(
            decode(&mut dec, &[0xbe]).unwrap(),
            vec![(b"k".to_vec(), all.clone())]
        );
    }

    #[test]
    fn encoder_round_trip() {
        let long = vec![b'v'; 200];
        let list: &[(&str, &[u8], bool)] = &[
            ("content-type", b"text/plain", false),
            ("date", b"Mon, 21 Oct 2013 20:13:21 GMT", false),
            ("server", b"bulkhead", false),
            ("x-request-id", b"0123456789abcdef", false),
            ("set-cookie", b"session=secret", true),
            ("x-secret", b"token", true),
            ("x-long", &long, false),
            ("www-authenticate", b"", false),
            (":authority", b"example.com", false),
        ];
        let mut block = Vec::new();
        encode_status(200, &mut block);
        encode_status(503, &mut block);
        for &(name, value, never) in list {
            encode_field(name, value, never, &mut block);
        }
        let mut want = fields(&[(":status", "200"), (":status", "503")]);
        want.extend(
            list.iter()
                .map(|&(n, v, _)| (n.as_bytes().to_vec(), v.to_vec())),
        );
        let mut dec = Decoder::new(4096);
        assert_eq!(decode(&mut dec, &block).unwrap(), want);
        assert_eq!(dec.table.size, 0);
        for status in 100..1000 {
            let mut block = Vec::new();
            encode_status(status, &mut block);
            let want = fields(&[(":status", &status.to_string())]);
            assert_eq!(decode(&mut dec, &block).unwrap(), want);
        }
    }

    #[test]
    fn encoder_bytes() {
        let bytes = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut dst = Vec::new();
            f(&mut dst);
            dst
        };
        assert_eq!(bytes(&|d| encode_status(200, d)), [0x88]);
        assert_eq!(bytes(&|d| encode_status(500, d)), [0x8e]);
        assert_eq!(
            bytes(&|d| encode_status(503, d)),
            [0x08, 0x03, b'5', b'0', b'3']
        );
        assert_eq!(
            bytes(&|d| encode_field("content-length", b"13", false, d)),
            [0x0f, 0x0d, 0x02, b'1', b'3']
        );
        assert_eq!(
            bytes(&|d| encode_field("age", b"0", true, d)),
            [0x1f, 0x06, 0x01, b'0']
        );
        assert_eq!(
            bytes(&|d| encode_field("server", b"", false, d)),
            [0x0f, 0x27, 0x00]
        );
        assert_eq!(
            bytes(&|d| encode_field("x-a", b"b", true, d)),
            [0x10, 0x03, b'x', b'-', b'a', 0x01, b'b']
        );
        let long = bytes(&|d| encode_field("x", &[b'v'; 200], false, d));
        assert_eq!(long[..5], [0x00, 0x01, b'x', 0x7f, 0x49]);
        assert_eq!(long.len(), 5 + 200);
        assert_eq!(bytes(&|d| encode_size_update(0, d)), [0x20]);
        assert_eq!(bytes(&|d| encode_size_update(4096, d)), [0x3f, 0xe1, 0x1f]);
    }

    #[test]
    fn static_name_index_matches_the_table() {
        for (i, &(name, _)) in STATIC.iter().enumerate() {
            let first = STATIC.iter().position(|&(n, _)| n == name).unwrap() + 1;
            let name = std::str::from_utf8(name).unwrap();
            assert_eq!(
                static_name_index(name),
                Some(first),
                "{name} (index {})",
                i + 1
            );
        }
        assert_eq!(static_name_index("x-request-id"), None);
        assert_eq!(static_name_index("Content-Type"), None);
    }

    /// Random blocks and mutations of valid ones: decoding never panics, and the
    /// table stays within its limit.
    #[test]
    fn random_input_never_panics() {
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1d);
        let mut valid: Vec<Vec<u8>> = [
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6",
            "4803 3330 37c1 c0bf",
            "3fe1 1f40 0a63 7573 746f 6d2d 6b65 790d 6375 7374 6f6d 2d68 6561 6465 72be",
        ]
        .iter()
        .map(|s| hex(s))
        .collect();
        valid.push(huffman_field(b"name", &(0..=255).collect::<Vec<u8>>()));
        let mut shared = Decoder::new(256);
        let run = |dec: &mut Decoder, block: &[u8]| {
            let _ = dec.decode(block, |_, _| {});
            assert!(dec.table.size <= dec.table.capacity);
            assert!(dec.table.capacity <= dec.max_size);
        };
        for _ in 0..5000 {
            let len = (next() % 65) as usize;
            let block: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            run(&mut Decoder::new(4096), &block);
            run(&mut shared, &block);
        }
        for base in &valid {
            for cut in 0..base.len() {
                run(&mut Decoder::new(4096), &base[..cut]);
            }
            for _ in 0..2000 {
                let mut block = base.clone();
                for _ in 0..1 + next() % 3 {
                    let at = (next() as usize) % block.len();
                    block[at] = match next() % 3 {
                        0 => next() as u8,
                        1 => block[at] ^ (1 << (next() % 8)),
                        _ => 0xff,
                    };
                }
                run(&mut Decoder::new(4096), &block);
                run(&mut shared, &block);
            }
        }
    }

    /// The fields of one response, as the gateway sends them: (name, value, sensitive).
    fn response(n: usize) -> Vec<(&'static str, String, bool)> {
        vec![
            ("server", "nginx/1.22.1".into(), false),
            ("date", format!("Fri, 27 Nov 2026 16:00:{n:02} GMT"), false),
            ("content-type", "text/plain".into(), false),
            ("content-length", "13".into(), false),
            ("ratelimit-policy", "\"tenant\";q=100;w=1".into(), false),
            ("ratelimit", format!("\"tenant\";r={n};t=1"), true),
            ("x-request-id", format!("{n:016x}"), true),
        ]
    }

    fn encode_response(enc: &mut Encoder, n: usize) -> Vec<u8> {
        let mut block = Vec::new();
        enc.begin(&mut block);
        encode_status(200, &mut block);
        for (name, value, sensitive) in response(n) {
            enc.field(name, value.as_bytes(), sensitive, &mut block);
        }
        block
    }

    fn decoded(dec: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        decode(dec, block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    fn expected(n: usize) -> Vec<(String, String)> {
        let mut f = vec![(":status".to_owned(), "200".to_owned())];
        f.extend(response(n).into_iter().map(|(n, v, _)| (n.to_owned(), v)));
        f
    }

    #[test]
    fn the_encoder_indexes_what_repeats_and_its_peer_decodes_every_response() {
        let (mut enc, mut dec) = (Encoder::default(), Decoder::new(4096));
        let first = encode_response(&mut enc, 1);
        assert_eq!(decoded(&mut dec, &first), expected(1));
        // server, content-type, ratelimit-policy, and the first ratelimit and
        // x-request-id (for their names) went into the table.
        assert_eq!(enc.entries.len(), 5);
        assert_eq!(enc.size, dec.table.size);
        for n in 2..50 {
            let block = encode_response(&mut enc, n);
            assert_eq!(decoded(&mut dec, &block), expected(n), "response {n}");
            let mut literal = vec![0x88];
            for (name, value, sensitive) in response(n) {
                encode_field(name, value.as_bytes(), sensitive, &mut literal);
            }
            assert!(
                block.len() + 50 < literal.len(),
                "{n}: {} bytes, as literals {}",
                block.len(),
                literal.len()
            );
            assert_eq!(enc.entries.len(), 5, "nothing more is inserted");
        }
        // The peer shrinks its table: emptied, two size updates, then only what fits.
        enc.set_max(64);
        let block = encode_response(&mut enc, 50);
        assert_eq!(block[0], 0x20, "size update to 0 first");
        assert_eq!(decoded(&mut dec, &block), expected(50));
        assert_eq!(dec.table.size, enc.size);
        assert!(
            enc.size <= 64 && enc.entries.len() == 1,
            "{:?}",
            enc.entries
        );
        let block = encode_response(&mut enc, 51);
        assert_eq!(decoded(&mut dec, &block), expected(51));
        // A table of 0: nothing is ever inserted.
        enc.set_max(0);
        for n in 52..55 {
            let block = encode_response(&mut enc, n);
            assert_eq!(decoded(&mut dec, &block), expected(n));
            assert!(enc.entries.is_empty() && dec.table.size == 0);
        }
        // A larger table allowed later changes nothing.
        enc.set_max(8192);
        assert!(enc.update.is_none() && enc.max == 0);
    }
}
