//! Frames of the TCP request plane. Each frame is length-delimited (4-byte big-endian length,
//! then the body); the body starts with a tag byte and the stream id, so that many streams
//! share one connection.
//!
//! | tag  | frame   | direction | after the stream id              |
//! |------|---------|-----------|----------------------------------|
//! | 0x01 | Request | to server | instance id (u64 LE), JSON body  |
//! | 0x02 | Cancel  | to server | nothing                          |
//! | 0x81 | Data    | to client | JSON body of one response        |
//! | 0x84 | Data    | to client | the same, and the stream ends    |
//! | 0x82 | End     | to client | nothing                          |
//! | 0x83 | Error   | to client | JSON `HandlerError`              |

use bytes::{Buf, BufMut, Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    Request {
        stream: u64,
        instance: u64,
        payload: Bytes,
    },
    Cancel {
        stream: u64,
    },
    /// `last` ends the stream with this response, saving an `End` frame: most streams
    /// (one-response calls, the final token) end this way.
    Data {
        stream: u64,
        payload: Bytes,
        last: bool,
    },
    End {
        stream: u64,
    },
    Error {
        stream: u64,
        payload: Bytes,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum WireError {
    #[error("frame of {0} bytes is too short for its header")]
    Truncated(usize),
    #[error("unknown frame tag {0:#04x}")]
    UnknownTag(u8),
}

const REQUEST: u8 = 0x01;
const CANCEL: u8 = 0x02;
const DATA: u8 = 0x81;
const END: u8 = 0x82;
const ERROR: u8 = 0x83;
const DATA_LAST: u8 = 0x84;

impl Frame {
    pub(crate) fn encode(&self) -> Bytes {
        let (tag, stream, instance, payload) = match self {
            Frame::Request {
                stream,
                instance,
                payload,
            } => (REQUEST, *stream, Some(*instance), Some(payload)),
            Frame::Cancel { stream } => (CANCEL, *stream, None, None),
            Frame::Data { stream, payload, last } => {
                (if *last { DATA_LAST } else { DATA }, *stream, None, Some(payload))
            }
            Frame::End { stream } => (END, *stream, None, None),
            Frame::Error { stream, payload } => (ERROR, *stream, None, Some(payload)),
        };
        let mut buf = BytesMut::with_capacity(17 + payload.map_or(0, |p| p.len()));
        buf.put_u8(tag);
        buf.put_u64_le(stream);
        if let Some(i) = instance {
            buf.put_u64_le(i);
        }
        if let Some(p) = payload {
            buf.put_slice(p);
        }
        buf.freeze()
    }

    pub(crate) fn decode(mut body: Bytes) -> Result<Frame, WireError> {
        let len = body.len();
        if len < 9 {
            return Err(WireError::Truncated(len));
        }
        let tag = body.get_u8();
        let stream = body.get_u64_le();
        Ok(match tag {
            REQUEST => {
                if body.len() < 8 {
                    return Err(WireError::Truncated(len));
                }
                let instance = body.get_u64_le();
                Frame::Request {
                    stream,
                    instance,
                    payload: body,
                }
            }
            CANCEL => Frame::Cancel { stream },
            DATA | DATA_LAST => Frame::Data {
                stream,
                payload: body,
                last: tag == DATA_LAST,
            },
            END => Frame::End { stream },
            ERROR => Frame::Error { stream, payload: body },
            other => return Err(WireError::UnknownTag(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Request {
                stream: 1,
                instance: u64::MAX,
                payload: Bytes::from_static(b"{}"),
            },
            Frame::Cancel { stream: 2 },
            Frame::Data {
                stream: 3,
                payload: Bytes::from_static(b"[1]"),
                last: false,
            },
            Frame::Data {
                stream: 3,
                payload: Bytes::new(),
                last: true,
            },
            Frame::End { stream: 4 },
            Frame::Error {
                stream: 5,
                payload: Bytes::from_static(b"x"),
            },
        ];
        for f in frames {
            assert_eq!(Frame::decode(f.encode()), Ok(f));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(
            Frame::decode(Bytes::from_static(b"\x01abc")),
            Err(WireError::Truncated(4))
        );
        assert_eq!(
            Frame::decode(Bytes::from_static(b"\x01\0\0\0\0\0\0\0\0\0")),
            Err(WireError::Truncated(10))
        );
        assert_eq!(
            Frame::decode(Bytes::from_static(b"\x7f\0\0\0\0\0\0\0\0")),
            Err(WireError::UnknownTag(0x7f))
        );
    }
}
