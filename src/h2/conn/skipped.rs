//! The stream ids a client skipped: a new stream id above the next one closes the idle
//! streams below it without their ever opening (RFC 9113 §5.1.1). HEADERS on one of
//! them later is an unexpected stream id, a connection error of type PROTOCOL_ERROR,
//! while HEADERS on a stream that did open and has closed is STREAM_CLOSED (§5.1);
//! both are below the highest id, so the skipped ones are remembered apart.
//!
//! Clients open their streams in order, so the list is empty on nearly every
//! connection and costs one comparison per stream. A client that skips often keeps
//! only its last [`MAX_RANGES`] gaps remembered: HEADERS on an older skipped id gets
//! STREAM_CLOSED instead, a connection error all the same.

/// Gaps remembered per connection.
const MAX_RANGES: usize = 16;

/// Ranges of client stream ids (first, last; both odd) that were never opened.
#[derive(Default)]
pub(super) struct Skipped {
    ranges: Vec<(u32, u32)>,
}

impl Skipped {
    /// Stream `stream` opens after `last_id` (0 before any): the ids between them are
    /// skipped.
    pub(super) fn opened(&mut self, last_id: u32, stream: u32) {
        let next = if last_id == 0 { 1 } else { last_id + 2 };
        if stream <= next {
            return;
        }
        if self.ranges.len() == MAX_RANGES {
            self.ranges.remove(0);
        }
        self.ranges.push((next, stream - 2));
    }

    /// Whether `stream` (below the highest id) was skipped rather than opened.
    pub(super) fn contains(&self, stream: u32) -> bool {
        self.ranges
            .iter()
            .any(|&(first, last)| (first..=last).contains(&stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_between_opened_streams_are_remembered() {
        let mut s = Skipped::default();
        s.opened(0, 1);
        s.opened(1, 3);
        assert!(s.ranges.is_empty(), "in order: nothing skipped");
        s.opened(3, 9);
        s.opened(9, 11);
        s.opened(11, 15);
        assert_eq!(s.ranges, [(5, 7), (13, 13)]);
        for (id, skipped) in [
            (1, false),
            (3, false),
            (5, true),
            (7, true),
            (9, false),
            (11, false),
            (13, true),
        ] {
            assert_eq!(s.contains(id), skipped, "{id}");
        }
        // A first stream above 1 skips the ids below it.
        let mut s = Skipped::default();
        s.opened(0, 5);
        assert_eq!(s.ranges, [(1, 3)]);
    }

    #[test]
    fn only_the_last_gaps_are_kept() {
        let mut s = Skipped::default();
        let mut last = 0;
        for i in 0..(MAX_RANGES as u32 + 4) {
            let next = 4 * i + 3;
            s.opened(last, next);
            last = next;
        }
        assert_eq!(s.ranges.len(), MAX_RANGES);
        assert!(!s.contains(1), "the oldest gaps are forgotten");
        assert!(s.contains(4 * (MAX_RANGES as u32 + 3) + 1));
    }
}
