//! The gateway's own HTTP/2 server (`src/h2`), on real sockets: a raw HTTP/2 client
//! (`support::raw_h2`: frames by hand, HPACK literals out, the library's HPACK decoder in),
//! hyper's client where a real one is more natural, and `h2load` / `nghttp`, against a
//! gateway in this process and real upstream servers. Each test is a short story of
//! what a client sees: the connection preface, flow control both ways, resets, the
//! connection and stream errors of RFC 9113, CONTINUATION, limits, trailers, graceful
//! shutdown and load.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame as BodyFrame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::raw_h2::*;
use support::{pattern, serve_tcp, Behavior, Digest, Gateway, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

// ---------------------------------------------------------------------------------------
// Gateways and upstreams
// ---------------------------------------------------------------------------------------

/// A gateway with one worker and tenant `t1` on [`HOST`], proxying to `up`;
/// `upstream_extra` is appended to `[upstreams.u]`.
fn gateway_with(up: SocketAddr, upstream_extra: &str) -> Gateway {
    Gateway::start(&format!(
        "[server]\nworkers = 1\n\n[upstreams.u]\ntargets = [\"{up}\"]\n{upstream_extra}\n\
         [tenants.t1]\nhosts = [\"{HOST}\"]\nupstream = \"u\"\n"
    ))
}

fn gateway(up: SocketAddr) -> Gateway {
    gateway_with(up, "")
}

/// An HTTP/1.1 upstream that holds every request whose path starts with `/hold` until
/// [`Held::release`], and answers the others at once; both with `path=<path>`.
struct Held {
    addr: SocketAddr,
    /// The paths of held requests, as they arrive.
    arrived: mpsc::UnboundedReceiver<String>,
    release: watch::Sender<bool>,
    /// The held requests that are over: (path, answered), `false` when the exchange was
    /// dropped (the gateway closed the connection) before its answer.
    finished: mpsc::UnboundedReceiver<(String, bool)>,
}

/// Reports a held exchange as finished when it is dropped.
struct Finish {
    path: String,
    answered: bool,
    tx: mpsc::UnboundedSender<(String, bool)>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let _ = self.tx.send((self.path.clone(), self.answered));
    }
}

impl Held {
    async fn start() -> Held {
        let (arrived_tx, arrived) = mpsc::unbounded_channel();
        let (finished_tx, finished) = mpsc::unbounded_channel();
        let (release, release_rx) = watch::channel(false);
        let addr = serve_tcp(move |tcp| {
            let (arrived_tx, finished_tx, release_rx) =
                (arrived_tx.clone(), finished_tx.clone(), release_rx.clone());
            async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (arrived_tx, finished_tx, mut release_rx) =
                        (arrived_tx.clone(), finished_tx.clone(), release_rx.clone());
                    async move {
                        let path = req.uri().path().to_owned();
                        let _ = req.into_body().collect().await;
                        if path.starts_with("/hold") {
                            let mut finish = Finish {
                                path: path.clone(),
                                answered: false,
                                tx: finished_tx,
                            };
                            let _ = arrived_tx.send(path.clone());
                            let _ = release_rx.wait_for(|r| *r).await;
                            finish.answered = true;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                            "path={path}"
                        )))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            }
        })
        .await;
        Held {
            addr,
            arrived,
            release,
            finished,
        }
    }

    /// Waits for the next held request to reach the upstream; returns its path.
    async fn next_arrival(&mut self) -> String {
        tokio::time::timeout(READ_TIMEOUT, self.arrived.recv())
            .await
            .expect("a held request reaches the upstream in time")
            .expect("the upstream is running")
    }

    /// Waits for the next held exchange to be over: (path, answered).
    async fn next_finished(&mut self) -> (String, bool) {
        tokio::time::timeout(READ_TIMEOUT, self.finished.recv())
            .await
            .expect("a held exchange ends in time")
            .expect("the upstream is running")
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

/// What the HTTP/2 trailer upstream saw of one request: body and trailers.
type TrailerSeen = Arc<Mutex<Vec<(Bytes, Option<HeaderMap>)>>>;

type EchoBody = StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<BodyFrame<Bytes>, Infallible>>>,
>;

/// An HTTP/2 (prior knowledge) upstream that records each request's body and trailers
/// and answers with the body, then trailers `x-upstream-trailer: done`.
async fn h2_trailer_upstream() -> (SocketAddr, TrailerSeen) {
    let seen: TrailerSeen = Arc::default();
    let seen2 = seen.clone();
    let addr = serve_tcp(move |tcp| {
        let seen = seen2.clone();
        async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let (trailers, body) = match req.into_body().collect().await {
                        Ok(c) => (c.trailers().cloned(), c.to_bytes()),
                        Err(_) => (None, Bytes::new()),
                    };
                    seen.lock().unwrap().push((body.clone(), trailers));
                    let mut t = HeaderMap::new();
                    t.insert("x-upstream-trailer", HeaderValue::from_static("done"));
                    let frames = vec![Ok(BodyFrame::data(body)), Ok(BodyFrame::trailers(t))];
                    let resp: Response<EchoBody> =
                        Response::new(StreamBody::new(futures_util::stream::iter(frames)));
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        }
    })
    .await;
    (addr, seen)
}

// ---------------------------------------------------------------------------------------
// 1. The connection preface
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_preface_advertises_its_limits_and_acknowledges_settings_and_pings() {
    let up = Upstream::echo("u").await;
    let gw = gateway(up.addr);
    let mut c = H2::open(gw.addr).await;

    // The server's preface: SETTINGS, then the connection window raised to 1 MiB; then
    // the acknowledgement of the client's SETTINGS.
    let first = c.read_frame().await.expect("the server's SETTINGS");
    assert_eq!((first.kind, first.flags, first.stream), (SETTINGS, 0, 0));
    let params: HashMap<u16, u32> = settings_params(&first.payload).into_iter().collect();
    assert_eq!(
        params.get(&MAX_CONCURRENT_STREAMS),
        Some(&256),
        "{params:?}"
    );
    assert_eq!(
        params.get(&INITIAL_WINDOW_SIZE),
        Some(&1_048_576),
        "{params:?}"
    );
    // The default max_header_bytes (16 KiB) gives hyper's backstop limit of 64 KiB.
    assert_eq!(
        params.get(&MAX_HEADER_LIST_SIZE),
        Some(&65_536),
        "{params:?}"
    );

    let second = c.read_frame().await.expect("the connection WINDOW_UPDATE");
    assert_eq!((second.kind, second.stream), (WINDOW_UPDATE, 0));
    let inc = u32::from_be_bytes(second.payload[..4].try_into().unwrap());
    assert_eq!(
        65_535 + inc,
        1_048_576,
        "the connection window becomes 1 MiB"
    );

    let third = c.read_frame().await.expect("the SETTINGS ACK");
    assert_eq!(
        (third.kind, third.flags, third.stream, third.payload.len()),
        (SETTINGS, ACK, 0, 0),
        "the client's SETTINGS are acknowledged"
    );
    c.send(&frame(SETTINGS, ACK, 0, &[])).await;

    // PING: acknowledged with the same 8 bytes.
    c.send(&frame(PING, 0, 0, b"\x01\x02\x03\x04\xf5\xf6\xf7\xf8"))
        .await;
    let pong = c.read_frame().await.expect("the PING ACK");
    assert_eq!((pong.kind, pong.flags, pong.stream), (PING, ACK, 0));
    assert_eq!(pong.payload, b"\x01\x02\x03\x04\xf5\xf6\xf7\xf8");

    // And the connection serves requests.
    let r = c.get(1, "/hello").await;
    assert_eq!(r.status, Some(200), "{r:?}");
    assert_eq!(r.header("content-type"), None);
    assert!(r.text().contains("\"path\":\"/hello\""), "{}", r.text());
    assert_eq!(c.goaway, None);
}

// ---------------------------------------------------------------------------------------
// 2. Flow control of responses
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_response_stays_within_the_clients_windows_and_frame_size() {
    const LEN: usize = 3 * 1024 * 1024;
    let up = Upstream::start(
        "big",
        Behavior::Bytes {
            len: LEN as u64,
            chunked: false,
        },
    )
    .await;
    let gw = gateway(up.addr);
    // Default windows (65,535) on both levels; given back only as the client reads.
    let mut c = H2::open(gw.addr).await;
    c.auto_window = false;
    c.headers(1, &request_block("GET", "/big", &[]), true).await;

    let (mut conn_w, mut stream_w) = (65_535i64, 65_535i64);
    let mut unacked = 0u32;
    let mut frames = 0;
    loop {
        let (kind, flags, id, len) = c.pump().await.unwrap_or_else(|| {
            panic!("the connection closed mid-body: {:?}", c.tail());
        });
        assert!(
            !matches!(kind, RST_STREAM | GOAWAY),
            "{kind} on {id}: {:?}",
            c.streams.get(&1)
        );
        if kind != DATA {
            continue;
        }
        assert_eq!(id, 1);
        assert!(len <= MAX_FRAME, "a DATA frame of {len} bytes");
        frames += 1;
        conn_w -= len as i64;
        stream_w -= len as i64;
        assert!(
            conn_w >= 0 && stream_w >= 0,
            "the server overran the windows: connection {conn_w}, stream {stream_w} after \
             DATA frame {frames} ({len} bytes)"
        );
        if flags & END_STREAM != 0 {
            break;
        }
        unacked += len as u32;
        if unacked >= 32 * 1024 {
            let mut wu = window_update(0, unacked);
            wu.extend_from_slice(&window_update(1, unacked));
            c.send(&wu).await;
            conn_w += i64::from(unacked);
            stream_w += i64::from(unacked);
            unacked = 0;
        }
    }
    let r = &c.streams[&1];
    assert_eq!(r.status, Some(200));
    assert_eq!(r.header("content-length"), Some(&*LEN.to_string()));
    assert_eq!(
        Digest::of(&r.body),
        Digest::of(&pattern(LEN)),
        "the body arrived whole"
    );
    assert!(frames >= LEN / MAX_FRAME, "{frames} DATA frames");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_initial_window_raised_later_gets_the_body() {
    const LEN: usize = 300 * 1024;
    let up = Upstream::start(
        "big",
        Behavior::Bytes {
            len: LEN as u64,
            chunked: true,
        },
    )
    .await;
    let gw = gateway(up.addr);
    let mut c = H2::start(gw.addr, &[(INITIAL_WINDOW_SIZE, 0)]).await;
    c.headers(1, &request_block("GET", "/zero", &[]), true)
        .await;
    c.until("the response head", |c| {
        c.streams.get(&1).is_some_and(|r| r.status.is_some())
    })
    .await;
    // Everything the server wrote before this PING is read: no body yet.
    c.ping(b"zerowind").await;
    let r = &c.streams[&1];
    assert_eq!(r.status, Some(200));
    assert!(
        r.body.is_empty() && !r.done(),
        "no DATA in a zero window: {} bytes, {r:?}",
        r.body.len()
    );
    // The window opens with a later SETTINGS (and the connection's, to be sure).
    let mut open = settings(&[(INITIAL_WINDOW_SIZE, 65_535)]);
    open.extend_from_slice(&window_update(0, 1 << 20));
    c.send(&open).await;
    let r = c.ok_response(1).await;
    assert_eq!(r.body.len(), LEN);
    assert_eq!(Digest::of(&r.body), Digest::of(&pattern(LEN)));
    assert_eq!(c.settings_acks, 2, "both SETTINGS acknowledged");
}

// ---------------------------------------------------------------------------------------
// 3. Flow control of request bodies
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_larger_than_the_windows_reaches_the_upstream() {
    const LEN: usize = 5 * 1024 * 1024;
    let up = Upstream::echo("u").await;
    let gw = gateway(up.addr);
    let mut c = H2::open(gw.addr).await;
    let body = pattern(LEN);
    c.headers(
        1,
        &request_block("POST", "/upload", &[("content-length", &LEN.to_string())]),
        false,
    )
    .await;
    c.send_body(1, &body, true).await;
    let r = c.ok_response(1).await;
    assert_eq!(r.status, Some(200), "{}", r.text());
    assert!(
        r.text().contains(&format!("\"body_len\":{LEN}")),
        "{}",
        r.text()
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, Digest::of(&body), "the body arrived whole");

    // A second one on the same connection: the windows were given back.
    c.headers(3, &request_block("POST", "/again", &[]), false)
        .await;
    c.send_body(3, &body, true).await;
    let r = c.ok_response(3).await;
    assert!(
        r.text().contains(&format!("\"body_len\":{LEN}")),
        "{}",
        r.text()
    );
    assert_eq!(up.seen()[1].body, Digest::of(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_posts_do_not_use_up_the_connection_window() {
    const N: u32 = 300;
    const LEN: usize = 4096;
    let up = Upstream::echo("u").await;
    let gw = gateway(up.addr);
    let mut c = H2::open(gw.addr).await;
    let body = pattern(LEN);
    for i in 0..N {
        let id = 2 * i + 1;
        c.headers(
            id,
            &request_block(
                "POST",
                &format!("/small/{i}"),
                &[("content-length", "4096")],
            ),
            false,
        )
        .await;
        c.send_body(id, &body, true).await;
        let r = c.ok_response(id).await;
        assert_eq!(r.status, Some(200), "POST {i}: {}", r.text());
        assert!(
            r.text().contains("\"body_len\":4096"),
            "POST {i}: {}",
            r.text()
        );
    }
    // 300 × 4 KiB is more than the 1 MiB connection window: it was given back.
    let seen = up.seen();
    assert_eq!(seen.len(), N as usize);
    assert!(seen.iter().all(|s| s.body == Digest::of(&body)));
}

/// A request the gateway answers itself before it reads the body — a declared length
/// over `max_body` (413), a host no tenant has (404), a streamed body that crosses
/// `max_body` (413) — is followed by RST_STREAM NO_ERROR (RFC 9113 §8.1: the client
/// may stop sending), and whatever DATA the client had already sent for it, up to its
/// full windows, still counts as received for the connection: the window comes back,
/// so the next streams on the connection are not starved. Checked on both servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_streams_body_is_credited_to_the_connection_window() {
    const MIB: usize = 1 << 20;
    let up = Upstream::echo("u").await;
    let toml = format!(
        "{}[tenants.t1.limits]\nmax_body = 1000\n",
        process_toml(up.addr, "")
    );
    let big = pattern(MIB);
    for (server, gw) in both_servers(&toml) {
        let mut c = H2::open(gw.addr).await;
        // The server's SETTINGS (its stream window) and connection window are in.
        c.ping(b"settings").await;
        let refusals = [
            (
                413,
                request_block("POST", "/declared", &[("content-length", "1048576")]),
            ),
            (
                404,
                request_block_at("POST", "/nobody", "nobody.example", &[]),
            ),
            (413, request_block("POST", "/streamed", &[])),
        ];
        for (i, (status, block)) in refusals.into_iter().enumerate() {
            let id = 2 * i as u32 + 1;
            c.headers(id, &block, false).await;
            // The client goes on sending the whole stream window's worth, as one whose
            // DATA was on its way before the answer would; each of these needs the
            // window the ones before it took.
            c.send_regardless(id, &big).await;
            c.until(&format!("stream {id}'s answer and its RST_STREAM"), |c| {
                c.streams
                    .get(&id)
                    .is_some_and(|r| r.end && r.reset.is_some())
            })
            .await;
            let r = c.streams[&id].clone();
            assert_eq!(r.status, Some(status), "{server}, stream {id}: {r:?}");
            assert!(r.end, "{server}, stream {id}: the response ended: {r:?}");
            assert_eq!(
                r.reset,
                Some(NO_ERROR),
                "{server}, stream {id}: the client is told to stop sending: {r:?}"
            );
        }
        // The connection still carries request bodies, and answers.
        let id = 7;
        c.headers(id, &request_block("POST", "/after", &[]), false)
            .await;
        c.send_body(id, &big[..1000], true).await;
        let r = c.ok_response(id).await;
        assert_eq!(r.status, Some(200), "{server}: {}", r.text());
        assert!(
            r.text().contains("\"body_len\":1000"),
            "{server}: {}",
            r.text()
        );
        let r = c.get(9, "/get").await;
        assert_eq!(r.status, Some(200), "{server}: {}", r.text());
        assert_eq!(c.goaway, None, "{server}");
    }
}

// ---------------------------------------------------------------------------------------
// 4. RST_STREAM from the client
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_is_dropped_and_the_connection_goes_on() {
    let mut up = Held::start().await;
    let gw = gateway(up.addr);
    let mut c = H2::open(gw.addr).await;
    c.headers(1, &request_block("GET", "/hold/1", &[]), true)
        .await;
    assert_eq!(up.next_arrival().await, "/hold/1");
    c.send(&rst_stream(1, CANCEL)).await;
    // The abandoned exchange is dropped upstream too (its connection closed), unanswered.
    assert_eq!(up.next_finished().await, ("/hold/1".to_owned(), false));

    // The connection still serves requests.
    let r = c.get(3, "/quick").await;
    assert_eq!((r.status, r.text().as_str()), (Some(200), "path=/quick"));

    // Nothing of the reset stream ever reaches the client.
    up.release();
    let r = c.get(5, "/after").await;
    assert_eq!((r.status, r.text().as_str()), (Some(200), "path=/after"));
    c.ping(b"afterrst").await;
    let on_1: Vec<_> = c.log.iter().filter(|f| f.2 == 1).collect();
    assert!(on_1.is_empty(), "frames on the reset stream: {on_1:?}");
    assert_eq!(c.goaway, None);
}

// ---------------------------------------------------------------------------------------
// 5. Connection errors
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_end_the_connection_with_goaway_and_the_right_code() {
    let up = Upstream::echo("u").await;
    let gw = gateway(up.addr);
    let get = request_block("GET", "/x", &[]);
    let cases: Vec<(&str, bool, Vec<u8>, u32)> = vec![
        (
            "a frame larger than 16,384 bytes",
            true,
            frame(DATA, 0, 1, &[0u8; MAX_FRAME + 1]),
            FRAME_SIZE_ERROR,
        ),
        (
            "DATA on stream 0",
            true,
            frame(DATA, 0, 0, b"abc"),
            PROTOCOL_ERROR,
        ),
        (
            "HEADERS on an even stream",
            true,
            frame(HEADERS, END_HEADERS | END_STREAM, 2, &get),
            PROTOCOL_ERROR,
        ),
        (
            "CONTINUATION without HEADERS",
            true,
            frame(CONTINUATION, END_HEADERS, 1, &get),
            PROTOCOL_ERROR,
        ),
        (
            "a first frame that is not SETTINGS",
            false,
            frame(PING, 0, 0, b"12345678"),
            PROTOCOL_ERROR,
        ),
        (
            "an HPACK block with index 0",
            true,
            frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x80]),
            COMPRESSION_ERROR,
        ),
        (
            "WINDOW_UPDATE of 0 on the connection",
            true,
            window_update(0, 0),
            PROTOCOL_ERROR,
        ),
    ];
    for (what, settings_first, bad, code) in cases {
        let mut c = H2::connect(gw.addr).await;
        let mut bytes = PREFACE.to_vec();
        if settings_first {
            bytes.extend_from_slice(&settings(&[]));
        }
        bytes.extend_from_slice(&bad);
        c.send(&bytes).await;
        let (_, got) = c.goaway_then_close().await;
        assert_eq!(got, code, "{what}: GOAWAY code {got}, frames {:?}", c.log);
        assert!(
            c.streams.values().all(|r| r.status.is_none()),
            "{what}: no response"
        );
    }
    assert!(up.seen().is_empty(), "{:?}", up.seen());
}

// ---------------------------------------------------------------------------------------
// 6. Stream errors: malformed requests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_rst_stream_and_the_connection_goes_on() {
    let up = Upstream::echo("u").await;
    let gw = gateway(up.addr);
    let mut c = H2::open(gw.addr).await;

    let mut no_path = vec![0x82, 0x86];
    hpack_indexed_name(&mut no_path, 1, HOST.as_bytes());
    let heads: Vec<(&str, Vec<u8>)> = vec![
        (
            "an uppercase header name",
            request_block("GET", "/bad/upper", &[("X-Upper", "1")]),
        ),
        (
            "a connection header",
            request_block("GET", "/bad/connection", &[("connection", "close")]),
        ),
        ("no :path", no_path),
        (
            "a value with a leading space",
            request_block("GET", "/bad/padded", &[("x-a", " a")]),
        ),
        (
            "a :path that is a query only",
            request_block("GET", "?x", &[]),
        ),
        ("a GET to *", request_block("GET", "*", &[])),
    ];
    let mut id = 1;
    for (what, block) in heads {
        c.headers(id, &block, true).await;
        let r = c.response(id).await;
        assert_eq!(r.reset, Some(PROTOCOL_ERROR), "{what}: {r:?}");
        assert_eq!(r.status, None, "{what}: {r:?}");
        id += 2;
    }

    // A content-length the DATA disagrees with: fewer bytes, then more.
    for (what, length, data) in [
        ("less DATA than content-length", "10", &b"abc"[..]),
        ("more DATA than content-length", "3", &b"abcde"[..]),
    ] {
        let block = request_block("POST", "/bad/length", &[("content-length", length)]);
        let mut bytes = frame(HEADERS, END_HEADERS, id, &block);
        bytes.extend_from_slice(&frame(DATA, END_STREAM, id, data));
        c.send(&bytes).await;
        let r = c.response(id).await;
        assert_eq!(r.reset, Some(PROTOCOL_ERROR), "{what}: {r:?}");
        id += 2;
    }

    // Two different lengths, the DATA fitting the first: forwarded as it was, the
    // upstream could read the body by the second — as a request of its own.
    let smuggled = format!("GET /bad/smuggled HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
    let len = smuggled.len().to_string();
    let block = request_block(
        "POST",
        "/bad/two-lengths",
        &[("content-length", &len), ("content-length", "0")],
    );
    let mut bytes = frame(HEADERS, END_HEADERS, id, &block);
    bytes.extend_from_slice(&frame(DATA, END_STREAM, id, smuggled.as_bytes()));
    c.send(&bytes).await;
    let r = c.response(id).await;
    assert_eq!(r.reset, Some(PROTOCOL_ERROR), "two lengths: {r:?}");
    id += 2;

    let r = c.get(id, "/good").await;
    assert_eq!(r.reset, None, "{r:?}");
    assert_eq!(r.status, Some(200));
    assert!(r.text().contains("\"path\":\"/good\""), "{}", r.text());
    assert_eq!(c.goaway, None, "stream errors, not a connection error");
    let paths: Vec<String> = up.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/good"], "nothing malformed reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_with_405_and_never_reaches_the_upstream() {
    let up = Upstream::echo("u").await;
    let gw = gateway(up.addr);
    let mut c = H2::open(gw.addr).await;
    // RFC 9113 §8.5: only :method and :authority.
    let mut block = Vec::new();
    hpack_indexed_name(&mut block, 2, b"CONNECT");
    hpack_indexed_name(&mut block, 1, format!("{HOST}:443").as_bytes());
    c.headers(1, &block, true).await;
    let r = c.response(1).await;
    assert_eq!(r.status, Some(405), "{r:?}");
    assert!(
        r.text().contains("\"error\":\"method_not_allowed\""),
        "{}",
        r.text()
    );
    assert!(
        r.header("allow").is_some_and(|a| a.contains("GET")),
        "{r:?}"
    );
    // The connection goes on, and nothing reached the upstream before this request.
    let r = c.get(3, "/after").await;
    assert_eq!(r.status, Some(200), "{r:?}");
    let paths: Vec<String> = up.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/after"]);
}

// ---------------------------------------------------------------------------------------
// 7, 8. CONTINUATION and the header list size
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_split_over_continuations_is_served() {
    let up = Upstream::echo("u").await;
    let gw = gateway(up.addr);
    let mut c = H2::open(gw.addr).await;
    let block = request_block(
        "GET",
        "/split",
        &[("x-split", "a value cut across three frames")],
    );
    // Cut inside the :path literal and inside the x-split value.
    let (a, rest) = block.split_at(5);
    let (b, d) = rest.split_at(rest.len() - 10);
    let mut bytes = frame(HEADERS, END_STREAM, 1, a);
    bytes.extend_from_slice(&frame(CONTINUATION, 0, 1, b));
    bytes.extend_from_slice(&frame(CONTINUATION, END_HEADERS, 1, d));
    c.send(&bytes).await;
    let r = c.ok_response(1).await;
    assert_eq!(r.status, Some(200));
    let seen = up.seen();
    assert_eq!(seen[0].path, "/split");
    assert_eq!(
        seen[0].headers["x-split"],
        "a value cut across three frames"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_header_list_size_gets_431() {
    let up = Upstream::echo("u").await;
    let gw = gateway(up.addr);
    let mut c = H2::open(gw.addr).await;
    c.until("the server's SETTINGS", |c| !c.server_settings.is_empty())
        .await;
    let limit = c.server_settings[0]
        .iter()
        .find(|(id, _)| *id == MAX_HEADER_LIST_SIZE)
        .map(|&(_, v)| v as usize)
        .expect("SETTINGS_MAX_HEADER_LIST_SIZE");
    assert_eq!(limit, 64 * 1024);

    let big = "b".repeat(70 * 1024);
    let block = request_block("GET", "/too-big", &[("x-big", &big)]);
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut bytes = frame(HEADERS, END_STREAM, 1, chunks.next().unwrap());
    while let Some(ch) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        bytes.extend_from_slice(&frame(CONTINUATION, flags, 1, ch));
    }
    c.send(&bytes).await;
    let r = c.response(1).await;
    assert_eq!(r.status, Some(431), "{r:?}");
    // The gateway's JSON answer, counted as every refusal (it was an empty 431 that no
    // metric or log line recorded).
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["error"], "headers_too_large", "{body}");
    assert_eq!(
        metric(
            gw.admin,
            "bulkhead_rejected_total{tenant=\"_unknown\",reason=\"headers_too_large\"}"
        )
        .await,
        1
    );

    // The connection goes on.
    let r = c.get(3, "/after").await;
    assert_eq!(r.status, Some(200), "{r:?}");
    assert_eq!(c.goaway, None);

    // One with a body to follow: answered the same, the body not waited for.
    let block = request_block("POST", "/too-big", &[("x-big", &big)]);
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut bytes = frame(HEADERS, 0, 5, chunks.next().unwrap());
    while let Some(ch) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        bytes.extend_from_slice(&frame(CONTINUATION, flags, 5, ch));
    }
    c.send(&bytes).await;
    let r = c.response(5).await;
    assert_eq!(r.status, Some(431), "{r:?}");
    c.send(&frame(DATA, END_STREAM, 5, b"late")).await;
    let r = c.get(7, "/after").await;
    assert_eq!(r.status, Some(200), "{r:?}");
    assert_eq!(c.goaway, None);
    let paths: Vec<String> = up.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/after", "/after"]);
}

/// A header block that never ends, and frames that carry nothing, are cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_continuations_or_empty_frames_end_with_enhance_your_calm() {
    let up = Held::start().await;
    let gw = gateway(up.addr);

    // CONTINUATIONs far past the header list size (64 KiB), never END_HEADERS.
    let mut c = H2::open(gw.addr).await;
    let mut bytes = frame(HEADERS, END_STREAM, 1, &request_block("GET", "/flood", &[]));
    for _ in 0..20 {
        bytes.extend_from_slice(&frame(CONTINUATION, 0, 1, &[0u8; MAX_FRAME]));
    }
    c.try_send(&bytes).await;
    let (_, code) = c.goaway_then_close().await;
    assert_eq!(
        code,
        ENHANCE_YOUR_CALM,
        "endless header block: {:?}",
        c.tail()
    );

    // Empty DATA frames on an open stream.
    let mut c = H2::open(gw.addr).await;
    let mut bytes = frame(
        HEADERS,
        END_HEADERS,
        1,
        &request_block("POST", "/hold/empty", &[]),
    );
    for _ in 0..1500 {
        bytes.extend_from_slice(&frame(DATA, 0, 1, &[]));
    }
    c.try_send(&bytes).await;
    let (_, code) = c.goaway_then_close().await;
    assert_eq!(code, ENHANCE_YOUR_CALM, "empty DATA frames: {:?}", c.tail());
    up.release();
}

// ---------------------------------------------------------------------------------------
// 9. SETTINGS_MAX_CONCURRENT_STREAMS
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_257th_concurrent_stream_is_refused() {
    let mut up = Held::start().await;
    let gw = gateway(up.addr);
    let mut c = H2::open(gw.addr).await;
    let mut bytes = Vec::new();
    for i in 0..257u32 {
        let block = request_block("GET", &format!("/hold/{i}"), &[]);
        bytes.extend_from_slice(&frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &block));
    }
    c.send(&bytes).await;
    let last = 2 * 256 + 1;
    let r = c.response(last).await;
    assert_eq!(r.reset, Some(REFUSED_STREAM), "{r:?}");
    for _ in 0..256 {
        up.next_arrival().await;
    }
    up.release();
    for i in 0..256u32 {
        let r = c.ok_response(2 * i + 1).await;
        assert_eq!(r.status, Some(200), "stream {}: {r:?}", 2 * i + 1);
        assert_eq!(r.text(), format!("path=/hold/{i}"));
    }
    assert_eq!(c.goaway, None);
}

// ---------------------------------------------------------------------------------------
// 10. Trailers (response trailers through the gateway are covered by tests/protocols.rs
// with hyper's client; here request trailers, and both on the wire)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_reach_an_http2_upstream_and_its_trailers_come_back() {
    let (addr, seen) = h2_trailer_upstream().await;
    let gw = gateway_with(addr, "protocol = \"h2\"\n");
    let mut c = H2::open(gw.addr).await;
    c.headers(
        1,
        &request_block(
            "POST",
            "/with-trailers",
            &[("te", "trailers"), ("content-type", "application/grpc")],
        ),
        false,
    )
    .await;
    c.send_body(1, b"hello trailers", false).await;
    let mut trailers = Vec::new();
    hpack_literal(&mut trailers, "x-checksum", b"abc123");
    c.send(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &trailers))
        .await;
    let r = c.ok_response(1).await;
    assert_eq!(r.status, Some(200), "{r:?}");
    assert_eq!(r.text(), "hello trailers");
    assert_eq!(r.trailer("x-upstream-trailer"), Some("done"), "{r:?}");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].0[..], b"hello trailers");
    let t = seen[0]
        .1
        .as_ref()
        .expect("the client's trailers reach the upstream");
    assert_eq!(t["x-checksum"], "abc123");
}

// ---------------------------------------------------------------------------------------
// 11. Graceful shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_goaway_and_lets_the_in_flight_stream_finish() {
    let mut up = Held::start().await;
    let mut gw = gateway(up.addr);
    let mut c = H2::open(gw.addr).await;
    c.headers(1, &request_block("GET", "/hold/inflight", &[]), true)
        .await;
    assert_eq!(up.next_arrival().await, "/hold/inflight");

    let running = gw.running.take().unwrap();
    running.shutdown();
    let drained = std::thread::spawn(move || running.wait());

    c.until("a GOAWAY", |c| c.goaway.is_some()).await;
    assert_eq!(c.goaway, Some((1, NO_ERROR)));
    assert!(
        !c.streams.get(&1).is_some_and(Resp::done),
        "still in flight"
    );

    up.release();
    let r = c.ok_response(1).await;
    assert_eq!(r.status, Some(200));
    assert_eq!(r.text(), "path=/hold/inflight");
    // Then the connection closes, and the gateway finishes draining.
    while c.pump().await.is_some() {}
    let joined = tokio::time::timeout(
        READ_TIMEOUT,
        tokio::task::spawn_blocking(move || drained.join()),
    )
    .await
    .expect("the gateway drains once the stream is done");
    assert!(joined.unwrap().is_ok());
}

// ---------------------------------------------------------------------------------------
// 11b. A connection that waits on its client (`server.header_read_timeout`)
// ---------------------------------------------------------------------------------------

/// A gateway whose `header_read_timeout` is 1 s.
fn impatient_gateway(up: SocketAddr) -> Gateway {
    Gateway::start(&format!(
        "[server]\nworkers = 1\nheader_read_timeout = \"1s\"\n\n[upstreams.u]\ntargets = [\"{up}\"]\n\
         [tenants.t1]\nhosts = [\"{HOST}\"]\nupstream = \"u\"\n"
    ))
}

/// Reads until the gateway closes the connection; whether it did so within `bound`
/// (generous: the gateway closes within 1 to 1.5 × `header_read_timeout`).
async fn closed_within(s: &mut TcpStream, bound: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(bound, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// As HTTP/1.1 keep-alive connections, an HTTP/2 connection with no stream open is
/// closed after `header_read_timeout` (GOAWAY NO_ERROR, then the close); one that has
/// not finished its preface or a header block — a slowloris that trickles it, or stops
/// — is closed too. A stream open for longer, waiting on the upstream, is not waiting
/// on the client: its connection stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_waits_on_its_client_is_closed_after_the_header_timeout() {
    let mut up = Held::start().await;
    let gw = impatient_gateway(up.addr);
    let bound = Duration::from_secs(8);

    // Idle after a request: GOAWAY naming the last stream, no error, then the close.
    let mut c = H2::open(gw.addr).await;
    assert_eq!(c.get(1, "/quick").await.status, Some(200));
    assert_eq!(c.goaway_then_close().await, (1, NO_ERROR));

    // Half the preface, then nothing.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&PREFACE[..10]).await.unwrap();
    assert!(closed_within(&mut s, bound).await, "half a preface");

    // A HEADERS frame cut short, its last bytes trickled slower than the bound needs.
    let mut c = H2::open(gw.addr).await;
    let head = frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &request_block("GET", "/never", &[]),
    );
    c.send(&head[..12]).await;
    let trickle = async {
        for b in &head[12..head.len() - 1] {
            tokio::time::sleep(Duration::from_millis(400)).await;
            if c.s.write_all(&[*b]).await.is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(bound, trickle).await;
    assert!(
        closed_within(&mut c.s, bound).await,
        "a trickled HEADERS frame"
    );

    // HEADERS without END_HEADERS, and no CONTINUATION.
    let mut c = H2::open(gw.addr).await;
    c.send(&frame(
        HEADERS,
        END_STREAM,
        1,
        &request_block("GET", "/never", &[]),
    ))
    .await;
    assert!(
        closed_within(&mut c.s, bound).await,
        "a header block never finished"
    );

    // A stream waiting on the upstream for three times the timeout: answered.
    let mut c = H2::open(gw.addr).await;
    c.headers(1, &request_block("GET", "/hold/long", &[]), true)
        .await;
    assert_eq!(up.next_arrival().await, "/hold/long");
    tokio::time::sleep(Duration::from_secs(3)).await;
    up.release();
    let r = c.ok_response(1).await;
    assert_eq!(r.text(), "path=/hold/long");
    assert_eq!(c.goaway, None, "no GOAWAY while the stream was open");
    assert!(!up.arrived.try_recv().is_ok_and(|p| p.contains("never")));
}

// ---------------------------------------------------------------------------------------
// 12. Real clients: h2load, nghttp, hyper
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_completes_every_request() {
    let up = Upstream::echo("u").await;
    let gw = gateway(up.addr);
    let port = gw.addr.port();
    let out = tokio::process::Command::new("h2load")
        .args(["-n", "2000", "-c", "4", "-m", "10"])
        .arg(format!("--connect-to=127.0.0.1:{port}"))
        .arg(format!("http://{HOST}:{port}/load"))
        .output()
        .await
        .expect("h2load runs (scripts/test.sh installs nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2000 succeeded, 0 failed, 0 errored"),
        "h2load: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("2000 2xx"), "{text}");
    assert!(text.contains("Application protocol: h2c"), "{text}");
    assert_eq!(up.seen().len(), 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nghttp_posts_a_file() {
    let up = Upstream::echo("u").await;
    let gw = gateway(up.addr);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("upload.bin");
    let data = pattern(200_000);
    std::fs::write(&path, &data).unwrap();
    let out = tokio::process::Command::new("nghttp")
        .arg("-v")
        .arg("-d")
        .arg(&path)
        .args(["-H", &format!(":authority: {HOST}")])
        .arg(format!("http://127.0.0.1:{}/upload", gw.addr.port()))
        .output()
        .await
        .expect("nghttp runs (scripts/test.sh installs nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nghttp failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(":status: 200"), "{text}");
    assert!(text.contains("\"body_len\":200000"), "{text}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].body, Digest::of(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_client_runs_concurrent_posts_on_one_connection() {
    let up = Upstream::echo("u").await;
    let gw = gateway(up.addr);
    let send = support::h2c::<Full<Bytes>>(&gw).await;
    let mut tasks = Vec::new();
    for i in 0..20usize {
        let mut send = send.clone();
        tasks.push(tokio::spawn(async move {
            let body = Bytes::from(pattern(100_000 + i * 1000));
            let req = Request::post(format!("http://{HOST}/h/{i}"))
                .body(Full::new(body.clone()))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                String::from_utf8_lossy(&text).into_owned(),
                body.len(),
            )
        }));
    }
    for t in tasks {
        let (status, text, len) = tokio::time::timeout(READ_TIMEOUT, t)
            .await
            .expect("the response in time")
            .unwrap();
        assert_eq!(status, 200, "{text}");
        assert!(text.contains(&format!("\"body_len\":{len}")), "{text}");
    }
    assert_eq!(up.seen().len(), 20);
}

// ---------------------------------------------------------------------------------------
// 13. Rapid reset
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_enhance_your_calm() {
    let up = Held::start().await;
    let gw = gateway(up.addr);
    let mut c = H2::open(gw.addr).await;
    let mut bytes = Vec::new();
    for i in 0..1000u32 {
        let id = 2 * i + 1;
        let block = request_block("GET", &format!("/hold/{i}"), &[]);
        bytes.extend_from_slice(&frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        bytes.extend_from_slice(&rst_stream(id, CANCEL));
    }
    // Then a PING: answered only if the server read all of it without stopping.
    bytes.extend_from_slice(&frame(PING, 0, 0, b"rapidrst"));
    // The server may close before it has read all of it.
    c.try_send(&bytes).await;
    c.until("a GOAWAY or the PING ACK", |c| {
        c.goaway.is_some() || !c.ping_acks.is_empty()
    })
    .await;
    assert!(
        c.goaway.is_some(),
        "1,000 streams opened and reset at once, and the server answered the PING after \
         them without a GOAWAY (resets: {}, streams answered: {})",
        c.streams.values().filter(|r| r.reset.is_some()).count(),
        c.streams.values().filter(|r| r.status.is_some()).count(),
    );
    let (last, code) = c.goaway_then_close().await;
    assert_eq!(
        code, ENHANCE_YOUR_CALM,
        "GOAWAY code {code} (last stream {last})"
    );
    assert!(last < 1999, "it stopped before the end: last stream {last}");
    up.release();
}

// ---------------------------------------------------------------------------------------
// hyper's server, still behind BULKHEAD_H2=hyper
// ---------------------------------------------------------------------------------------

/// `BULKHEAD_H2=hyper` serves HTTP/2 with hyper's server (its SETTINGS differ from
/// ours), and requests with and without a body still go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulkhead_h2_hyper_switches_to_hypers_server() {
    let up = Upstream::echo("u").await;
    let toml = format!(
        "[server]\nworkers = 1\n\n[upstreams.u]\ntargets = [\"{}\"]\n\n\
         [tenants.t1]\nhosts = [\"{HOST}\"]\nupstream = \"u\"\n",
        up.addr
    );
    let ours = support::Process::start(&toml);
    let hypers = support::Process::start_with_env(&toml, &[], &[("BULKHEAD_H2", "hyper")]);
    let mut ids = Vec::new();
    for gw in [&ours, &hypers] {
        let mut c = H2::open(gw.addr).await;
        let r = c.get(1, "/plain").await;
        assert_eq!(r.status, Some(200), "{:?}", r.headers);
        assert!(r.header("x-request-id").is_some(), "{:?}", r.headers);
        assert!(String::from_utf8_lossy(&r.body).contains("\"path\":\"/plain\""));
        c.headers(3, &request_block("POST", "/posted", &[]), false)
            .await;
        c.send_body(3, &pattern(70_000), true).await;
        let r = c.ok_response(3).await;
        assert!(
            String::from_utf8_lossy(&r.body).contains("\"body_len\":70000"),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        let mut settings: Vec<u16> = c.server_settings[0].iter().map(|(id, _)| *id).collect();
        settings.sort_unstable();
        ids.push(settings);
    }
    assert_eq!(
        ids[0],
        [
            MAX_CONCURRENT_STREAMS,
            INITIAL_WINDOW_SIZE,
            MAX_HEADER_LIST_SIZE
        ],
        "ours"
    );
    assert_ne!(
        ids[1], ids[0],
        "hyper's server answered with hyper's SETTINGS"
    );
}

// ---------------------------------------------------------------------------------------
// 13. What the access log and the metrics count: the bytes on the wire
// ---------------------------------------------------------------------------------------

/// Tenant `t1` on [`HOST`] proxying to `up`, with `server` lines added to `[server]`.
fn process_toml(up: SocketAddr, server: &str) -> String {
    format!(
        "[server]\nworkers = 1\n{server}\n[upstreams.u]\ntargets = [\"{up}\"]\n\n\
         [tenants.t1]\nhosts = [\"{HOST}\"]\nupstream = \"u\"\n"
    )
}

/// The gateway binary on `toml`: its own HTTP/2 server, and hyper's (`BULKHEAD_H2=hyper`).
fn both_servers(toml: &str) -> [(&'static str, support::Process); 2] {
    [
        ("ours", support::Process::start(toml)),
        (
            "hyper's",
            support::Process::start_with_env(toml, &[], &[("BULKHEAD_H2", "hyper")]),
        ),
    ]
}

/// A sample of the gateway's `/metrics` (`name{labels}`), 0 when it is not exported.
async fn metric(admin: SocketAddr, key: &str) -> u64 {
    let r = support::get(admin, "/metrics", &[]).await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The value of `name=` in a text access-log line.
fn log_field<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + name.len()
        + 2;
    line[start..].split_whitespace().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_answered_by_the_gateway_itself_ends_at_its_headers() {
    // RFC 9110 §9.3.2: the GET's headers, content-length included, and no content. A
    // DATA frame after them made curl fail the stream (PROTOCOL_ERROR, exit 92)
    // without showing the status, and the body was counted as sent.
    let up = Upstream::echo("u").await;
    for (server, gw) in both_servers(&process_toml(up.addr, "")) {
        let mut c = H2::open(gw.addr).await;
        let unknown =
            |method, id| request_block_at(method, "/x", "nobody.example", &[("x-request-id", id)]);
        c.headers(1, &unknown("GET", "rid-get1"), true).await;
        let get = c.ok_response(1).await;
        assert_eq!(get.status, Some(404), "{server}");
        assert!(!get.body.is_empty(), "{server}: the GET has the JSON body");
        c.headers(3, &unknown("HEAD", "rid-head"), true).await;
        let head = c.ok_response(3).await;
        assert_eq!(head.status, Some(404), "{server}");
        assert!(head.body.is_empty(), "{server}: a body on a HEAD: {head:?}");
        assert_eq!(
            head.header("content-length"),
            Some(&*get.body.len().to_string()),
            "{server}: the GET's length"
        );
        let data: Vec<_> = c.log.iter().filter(|f| f.0 == DATA && f.2 == 3).collect();
        assert!(data.is_empty(), "{server}: DATA on the HEAD: {data:?}");

        let line = gw.log_line(&["access:", "rid-head"]).await;
        assert_eq!(log_field(&line, "status"), "404", "{server}: {line}");
        assert_eq!(log_field(&line, "bytes_out"), "0", "{server}: {line}");
        assert_eq!(
            log_field(&line, "reason"),
            "\"unknown_tenant\"",
            "{server}: {line}"
        );
        let key = "bulkhead_response_body_bytes_total{tenant=\"_unknown\"}";
        assert_eq!(
            metric(gw.admin, key).await,
            get.body.len() as u64,
            "{server}: only the GET's body was sent"
        );

        // A HEAD proxied to the upstream is as it was: its headers, no body.
        c.headers(5, &request_block("HEAD", "/p", &[]), true).await;
        let proxied = c.ok_response(5).await;
        assert_eq!(proxied.status, Some(200), "{server}");
        assert!(proxied.body.is_empty(), "{server}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_to_a_chunked_resource_gets_no_made_up_content_length() {
    // The upstream answers HEAD with the GET's headers: chunked, no length. The
    // response's head carries END_STREAM; `content-length: 0` on it would tell the
    // client the GET's body is empty.
    let up = serve_tcp(|mut s| async move {
        while support::read_request_head(&mut s).await {
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            if s.write_all(head).await.is_err() {
                return;
            }
        }
    })
    .await;
    for (server, gw) in both_servers(&process_toml(up, "")) {
        let mut c = H2::open(gw.addr).await;
        c.headers(1, &request_block("HEAD", "/chunked", &[]), true)
            .await;
        let r = c.ok_response(1).await;
        assert_eq!(r.status, Some(200), "{server}");
        assert!(r.body.is_empty(), "{server}");
        assert_eq!(r.header("content-length"), None, "{server}: {r:?}");
    }
}

/// An HTTP/1.1 upstream that answers every request with `len` pattern bytes
/// (Content-Length), without reading any request body.
async fn bytes_upstream(len: u64) -> Upstream {
    Upstream::start(
        "u",
        Behavior::Bytes {
            len,
            chunked: false,
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_out_counts_what_reached_the_connection_not_what_the_upstream_gave() {
    // A client with the default 65,535-byte windows that never opens them: the gateway
    // cannot have sent more than that of a 70,000-byte response. The rest, taken from
    // the upstream, was thrown away when the client reset the stream.
    const LEN: u64 = 70_000;
    let up = bytes_upstream(LEN).await;
    let gw = support::Process::start(&process_toml(up.addr, ""));
    let mut c = H2::open(gw.addr).await;
    c.auto_window = false;
    c.headers(
        1,
        &request_block("GET", "/big", &[("x-request-id", "rid-cut")]),
        true,
    )
    .await;
    c.until("the window's worth of body", |c| {
        c.streams.get(&1).is_some_and(|r| r.body.len() == 65_535)
    })
    .await;
    c.send(&rst_stream(1, CANCEL)).await;
    c.ping(b"afterrst").await;
    let line = gw.log_line(&["access:", "rid-cut"]).await;
    assert_eq!(log_field(&line, "status"), "200", "{line}");
    assert_eq!(log_field(&line, "bytes_out"), "65535", "{line}");
    assert_eq!(log_field(&line, "reason"), "\"client_closed\"", "{line}");
    let key = "bulkhead_response_body_bytes_total{tenant=\"t1\"}";
    assert_eq!(metric(gw.admin, key).await, 65_535);

    // Several streams share the connection's window: together they got 65,535 bytes,
    // and the client then closed the connection.
    let mut c = H2::open(gw.addr).await;
    c.auto_window = false;
    for (id, rid) in [(1, "rid-many1"), (3, "rid-many3"), (5, "rid-many5")] {
        c.headers(
            id,
            &request_block("GET", "/big", &[("x-request-id", rid)]),
            true,
        )
        .await;
    }
    let received = |c: &H2| c.streams.values().map(|r| r.body.len()).sum::<usize>();
    c.until("the connection window's worth of body", |c| {
        received(c) == 65_535
    })
    .await;
    drop(c);
    let mut logged = 0;
    for rid in ["rid-many1", "rid-many3", "rid-many5"] {
        let line = gw.log_line(&["access:", rid]).await;
        logged += log_field(&line, "bytes_out").parse::<u64>().unwrap();
    }
    assert_eq!(logged, 65_535, "Σ bytes_out");
    assert_eq!(metric(gw.admin, key).await, 2 * 65_535);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_in_counts_a_body_the_upstream_answered_before_reading() {
    // The upstream answers as soon as it has the request head, then holds the end of
    // its response; the client sends its body only once it has the response head.
    // The gateway received all of it, though the upstream exchange took none.
    let (tx, rx) = watch::channel(false);
    let up = serve_tcp(move |mut s| {
        let mut rx = rx.clone();
        async move {
            if support::read_request_head(&mut s).await {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
                    .await;
                let _ = rx.wait_for(|go| *go).await;
                let _ = s.write_all(b"cd").await;
                let mut buf = [0u8; 1024];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        }
    })
    .await;
    let gw = support::Process::start(&process_toml(up, ""));
    let mut c = H2::open(gw.addr).await;
    let head = [("content-length", "900"), ("x-request-id", "rid-early")];
    c.headers(1, &request_block("POST", "/early", &head), false)
        .await;
    c.until("the response head", |c| {
        c.streams.get(&1).is_some_and(|r| r.status.is_some())
    })
    .await;
    c.send_body(1, &[b'z'; 900], true).await;
    // Once the PING is answered, the gateway has handled the DATA before it.
    c.ping(b"bodysent").await;
    tx.send_replace(true);
    let r = c.ok_response(1).await;
    assert_eq!(r.text(), "abcd");
    let line = gw.log_line(&["access:", "rid-early"]).await;
    assert_eq!(log_field(&line, "bytes_in"), "900", "{line}");
    let key = "bulkhead_request_body_bytes_total{tenant=\"t1\"}";
    assert_eq!(metric(gw.admin, key).await, 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_bytes_that_arrive_after_the_stream_ended_count_nowhere() {
    // README: the response is over before the body, so the stream ends (RST_STREAM
    // NO_ERROR) and its line is written; DATA the client had already sent after that
    // is dropped, in `bytes_in` and in `request_body_bytes_total` alike — the metric
    // stays the sum of the lines.
    let (tx, rx) = watch::channel(false);
    let up = serve_tcp(move |mut s| {
        let mut rx = rx.clone();
        async move {
            if support::read_request_head(&mut s).await {
                let _ = rx.wait_for(|go| *go).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                let mut buf = [0u8; 1024];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        }
    })
    .await;
    let gw = support::Process::start(&process_toml(up, ""));
    let mut c = H2::open(gw.addr).await;
    let head = [("content-length", "900"), ("x-request-id", "rid-late")];
    c.headers(1, &request_block("POST", "/late", &head), false)
        .await;
    c.send_body(1, &[b'a'; 300], false).await;
    // Once the PING is answered, the gateway has handled the DATA before it.
    c.ping(b"300sent!").await;
    tx.send_replace(true);
    let r = c.response(1).await;
    assert_eq!((r.status, r.text().as_str()), (Some(200), "ok"), "{r:?}");
    c.until("the stream's end", |c| c.streams[&1].reset.is_some())
        .await;
    assert_eq!(c.streams[&1].reset, Some(NO_ERROR));
    c.send_regardless(1, &[b'b'; 600]).await;
    c.send(&frame(DATA, END_STREAM, 1, &[])).await;
    c.ping(b"600sent!").await;
    let line = gw.log_line(&["access:", "rid-late"]).await;
    assert_eq!(log_field(&line, "bytes_in"), "300", "{line}");
    let key = "bulkhead_request_body_bytes_total{tenant=\"t1\"}";
    assert_eq!(metric(gw.admin, key).await, 300);
    assert_eq!(c.goaway, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stalls_mid_body_gets_the_stream_reset_with_internal_error() {
    // README (`body_idle_timeout`): the upstream failed mid-response, so the stream is
    // reset with INTERNAL_ERROR, as for any upstream failure after the head, and on
    // hyper's server too (CANCEL is for a client that takes nothing).
    let up = serve_tcp(|mut s| async move {
        if support::read_request_head(&mut s).await {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                .await;
            let mut buf = [0u8; 64];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        }
    })
    .await;
    for (server, gw) in both_servers(&process_toml(up, "body_idle_timeout = \"300ms\"")) {
        let mut c = H2::open(gw.addr).await;
        c.headers(
            1,
            &request_block("GET", "/", &[("x-request-id", "rid-stall")]),
            true,
        )
        .await;
        let r = c.response(1).await;
        assert_eq!(r.status, Some(200), "{server}");
        assert_eq!(r.body, b"0123456789", "{server}");
        assert_eq!(r.reset, Some(INTERNAL_ERROR), "{server}: {r:?}");
        let line = gw.log_line(&["access:", "rid-stall"]).await;
        assert_eq!(
            log_field(&line, "reason"),
            "\"upstream_stalled\"",
            "{server}: {line}"
        );
    }
}
