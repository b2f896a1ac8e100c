//! Server-sent events split out of a byte stream: each event's `data:` lines, joined.

/// Accumulates bytes and hands back complete events' data.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
}

/// Events larger than this are refused: a server streaming one token at a time never comes
/// near it, and an endless line must not grow the buffer without bound.
pub const MAX_EVENT_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an event exceeds {MAX_EVENT_BYTES} bytes")]
    TooLarge,
    #[error("an event is not UTF-8")]
    NotUtf8,
}

impl SseDecoder {
    /// Adds `bytes` and returns the data of every event they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, SseError> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, sep)) = find_blank_line(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end + sep).take(end).collect();
            let text = std::str::from_utf8(&event).map_err(|_| SseError::NotUtf8)?;
            if let Some(data) = data_of(text) {
                events.push(data);
            }
        }
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(SseError::TooLarge);
        }
        Ok(events)
    }

    /// What a stream that ended left: a last event without its blank line, which some
    /// servers send.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        data_of(std::str::from_utf8(&rest).ok()?)
    }
}

/// Where the first blank line starts, and how long the separator is.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\n\n") {
            Some((i, 2))
        } else if buf[i..].starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else {
            None
        }
    })
}

fn data_of(event: &str) -> Option<String> {
    let mut data: Option<String> = None;
    for line in event.lines() {
        let Some(value) = line.strip_prefix("data:") else {
            continue;
        };
        let value = value.strip_prefix(' ').unwrap_or(value);
        match &mut data {
            Some(d) => {
                d.push('\n');
                d.push_str(value);
            }
            None => data = Some(value.to_owned()),
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads_and_separators() {
        let mut d = SseDecoder::default();
        assert_eq!(d.push(b"data: {\"a\"").unwrap(), Vec::<String>::new());
        assert_eq!(
            d.push(b":1}\n\ndata: x\r\n\r\n: comment\n\ndata:").unwrap(),
            vec!["{\"a\":1}", "x"]
        );
        assert_eq!(d.push(b" [DONE]\n\n").unwrap(), vec!["[DONE]"]);
        assert_eq!(d.push(b"data: a\ndata: b\n\nevent: ping\n\n").unwrap(), vec!["a\nb"]);
        assert_eq!(d.push(b"data: tail").unwrap(), Vec::<String>::new());
        assert_eq!(d.finish().as_deref(), Some("tail"));
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut d = SseDecoder::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert_eq!(d.push(&big), Err(SseError::TooLarge));
    }
}
