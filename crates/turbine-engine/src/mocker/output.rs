//! Where a sequence's tokens wait for its reader: one slot per sequence, not a queue.
//!
//! The engine only counts tokens: a sequence's output tokens are a pure function of its
//! seed and their position ([`TokenSource`]), so the reader computes the values when it
//! takes them. A reader that keeps up gets one token per output, one that falls behind
//! gets several, and nothing grows without bound.
//!
//! At a million tokens a second the cost is memory traffic, not instructions: per token
//! the engine touches one small shared allocation (a counter and a waker) instead of
//! appending to two token vectors behind a lock, and the reader is woken only if it
//! registered its waker since the last wake-up.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use futures::Stream;
use turbine_protocols::{EngineOutput, FinishReason};

use crate::EngineError;

/// The tokens a sequence generates: drawn uniformly from the vocabulary by a counter-based
/// SplitMix64, so the `i`th token depends only on the seed and `i`. Reproducible, not
/// unpredictable, and computable by whoever needs it without being stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokenSource {
    seed: u64,
    vocab_start: u32,
    vocab_len: u32,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl TokenSource {
    /// `vocab` must not be empty (the configuration is validated first).
    pub(crate) fn new(seed: u64, vocab: &std::ops::Range<u32>) -> Self {
        Self {
            seed,
            vocab_start: vocab.start,
            vocab_len: vocab.end.saturating_sub(vocab.start).max(1),
        }
    }

    /// The `i`th generated token, counting from 0.
    pub(crate) fn token(&self, i: u32) -> u32 {
        let mut z = self.seed.wrapping_add(GOLDEN_GAMMA.wrapping_mul(u64::from(i) + 1));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        self.vocab_start + (z % u64::from(self.vocab_len)) as u32
    }
}

// The slot's state word: tokens produced so far, how the sequence finished (set with its
// last token, in the same update, so that a reader that sees it has seen every token),
// and whether either side has gone.
const COUNT_MASK: u64 = 0xFFFF_FFFF;
const FINISH_SHIFT: u32 = 32;
const FINISH_MASK: u64 = 0xFF << FINISH_SHIFT;
const READER_GONE: u64 = 1 << 40;
const WRITER_GONE: u64 = 1 << 41;
const NO_CACHED: u32 = u32::MAX;

fn finish_code(finish: Option<FinishReason>) -> u64 {
    let code = match finish {
        None => 0,
        Some(FinishReason::Stop) => 1,
        Some(FinishReason::Length) => 2,
        Some(FinishReason::Cancelled) => 3,
    };
    code << FINISH_SHIFT
}

fn finish_of(state: u64) -> Option<FinishReason> {
    match (state & FINISH_MASK) >> FINISH_SHIFT {
        1 => Some(FinishReason::Stop),
        2 => Some(FinishReason::Length),
        3 => Some(FinishReason::Cancelled),
        _ => None,
    }
}

// In this order so that `OutputWriter::warm` reaches both ends of the slot, which may
// straddle two cache lines.
#[derive(Debug)]
#[repr(C)]
struct Slot {
    state: AtomicU64,
    waker: AtomicWaker,
    /// Prompt tokens served from cache; written before the first token is counted.
    cached_tokens: AtomicU32,
}

/// The engine's end.
#[derive(Debug)]
pub(crate) struct OutputWriter(Arc<Slot>);

/// The reader's end: a stream of [`EngineOutput`]s.
#[derive(Debug)]
pub(crate) struct OutputReader {
    slot: Arc<Slot>,
    source: TokenSource,
    /// Tokens handed out so far.
    delivered: u32,
    done: bool,
}

pub(crate) fn output_slot(source: TokenSource) -> (OutputWriter, OutputReader) {
    let slot = Arc::new(Slot {
        state: AtomicU64::new(0),
        cached_tokens: AtomicU32::new(NO_CACHED),
        waker: AtomicWaker::new(),
    });
    let reader = OutputReader {
        slot: slot.clone(),
        source,
        delivered: 0,
        done: false,
    };
    (OutputWriter(slot), reader)
}

impl OutputWriter {
    /// Counts one more token; false once the reader is gone.
    pub(crate) fn push(&self, cached_tokens: Option<u32>, finish: Option<FinishReason>) -> bool {
        if let Some(c) = cached_tokens {
            self.0.cached_tokens.store(c.min(NO_CACHED - 1), Ordering::Relaxed);
        }
        let old = self.0.state.fetch_add(1 | finish_code(finish), Ordering::Release);
        if old & READER_GONE != 0 {
            return false;
        }
        // Takes the waker only if the reader registered one since the last wake-up, so a
        // reader that lags is woken once for all the tokens it will find.
        self.0.waker.wake();
        true
    }
}

impl OutputWriter {
    /// Brings the slot into cache ahead of [`Self::push`]; see `Scheduler::touch_sinks`.
    pub(crate) fn warm(&self) {
        std::hint::black_box(self.0.state.load(Ordering::Relaxed));
        std::hint::black_box(self.0.cached_tokens.load(Ordering::Relaxed));
    }
}

impl Drop for OutputWriter {
    fn drop(&mut self) {
        self.0.state.fetch_or(WRITER_GONE, Ordering::Release);
        self.0.waker.wake();
    }
}

impl OutputReader {
    fn take(&mut self, state: u64) -> EngineOutput {
        let produced = (state & COUNT_MASK) as u32;
        let cached_tokens = if self.delivered == 0 {
            let c = self.slot.cached_tokens.load(Ordering::Relaxed);
            (c != NO_CACHED).then_some(c)
        } else {
            None
        };
        let token_ids = (self.delivered..produced).map(|i| self.source.token(i)).collect();
        self.delivered = produced;
        let finish_reason = finish_of(state);
        self.done = finish_reason.is_some();
        EngineOutput {
            token_ids,
            finish_reason,
            cached_tokens,
        }
    }
}

impl Stream for OutputReader {
    type Item = Result<EngineOutput, EngineError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut registered = false;
        loop {
            let state = self.slot.state.load(Ordering::Acquire);
            if (state & COUNT_MASK) as u32 > self.delivered {
                return Poll::Ready(Some(Ok(self.take(state))));
            }
            if state & WRITER_GONE != 0 {
                self.done = true;
                return Poll::Ready(None);
            }
            if registered {
                return Poll::Pending;
            }
            // Register, then look again: a token counted in between is not missed.
            self.slot.waker.register(cx.waker());
            registered = true;
        }
    }
}

impl Drop for OutputReader {
    fn drop(&mut self) {
        self.slot.state.fetch_or(READER_GONE, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn source() -> TokenSource {
        TokenSource::new(7, &(0..32000))
    }

    #[tokio::test]
    async fn a_slow_reader_gets_tokens_together_and_the_end() {
        let s = source();
        let (w, mut r) = output_slot(s);
        assert!(w.push(Some(0), None));
        assert!(w.push(None, None));
        let first = r.next().await.unwrap().unwrap();
        assert_eq!(
            (first.token_ids, first.cached_tokens, first.finish_reason),
            (vec![s.token(0), s.token(1)], Some(0), None)
        );
        assert!(w.push(None, Some(FinishReason::Length)));
        let last = r.next().await.unwrap().unwrap();
        assert_eq!(
            (last.token_ids, last.cached_tokens, last.finish_reason),
            (vec![s.token(2)], None, Some(FinishReason::Length))
        );
        assert!(r.next().await.is_none());
    }

    #[tokio::test]
    async fn a_waiting_reader_is_woken_by_the_next_token() {
        let s = source();
        let (w, mut r) = output_slot(s);
        let reader = tokio::spawn(async move { r.next().await.unwrap().unwrap().token_ids });
        tokio::task::yield_now().await;
        assert!(w.push(None, None));
        assert_eq!(reader.await.unwrap(), vec![s.token(0)]);
    }

    #[tokio::test]
    async fn either_side_going_away_is_seen() {
        let (w, mut r) = output_slot(source());
        drop(w);
        assert!(r.next().await.is_none(), "writer gone: the stream ends");
        let (w, r) = output_slot(source());
        drop(r);
        assert!(!w.push(None, None), "reader gone: the writer is told");
    }

    #[test]
    fn tokens_are_those_of_a_sequential_splitmix64() {
        // The generator the mocker used before tokens were computed by position.
        let mut state: u64 = 42;
        let s = TokenSource::new(42, &(5..1005));
        for i in 0..100 {
            state = state.wrapping_add(GOLDEN_GAMMA);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            assert_eq!(s.token(i), 5 + (z % 1000) as u32);
        }
    }
}
