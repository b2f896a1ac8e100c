//! Finding stop strings in streamed text without emitting any part of one.

use crate::Error;

/// Most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 32;

/// What to do with one delta of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Emit `emit`; more text may follow.
    Continue { emit: String },
    /// Stop string number `stop` completed: emit `emit`, the text before it, and end the stream.
    Stopped { emit: String, stop: usize },
}

/// Watches streamed text for stop strings, holding back any tail that could still become one.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Watches for `stops`; empty strings are ignored.
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Result<Self, Error> {
        let stops: Vec<String> = stops.into_iter().map(Into::into).filter(|s| !s.is_empty()).collect();
        if stops.len() > MAX_STOP_STRINGS {
            return Err(Error::TooManyStopStrings { count: stops.len() });
        }
        Ok(Self {
            stops,
            held: String::new(),
            stopped: false,
        })
    }

    /// Feeds the next delta. The first delta that completes a stop string ends the stream,
    /// cut where the earliest stop string complete by then begins (a longer stop string that
    /// began earlier but is not complete yet does not win). After [`StopOutcome::Stopped`]
    /// everything is swallowed.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome::Continue { emit: String::new() };
        }
        self.held.push_str(delta);
        let first = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, i)))
            .min();
        if let Some((at, stop)) = first {
            self.stopped = true;
            self.held.truncate(at);
            return StopOutcome::Stopped {
                emit: std::mem::take(&mut self.held),
                stop,
            };
        }
        let keep = self.partial_match_len();
        let emit = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        StopOutcome::Continue { emit }
    }

    /// The text held back when the stream ends without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Text held back because it may be the start of a stop string.
    pub fn held(&self) -> &str {
        &self.held
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Length of the longest tail of the held text that is a proper prefix of a stop string.
    fn partial_match_len(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > best && self.held.ends_with(&s[..k]) {
                    best = k;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (Vec<String>, Option<usize>, String) {
        let mut m = StopMatcher::new(stops.iter().copied()).unwrap();
        let mut out = Vec::new();
        for d in deltas {
            match m.push(d) {
                StopOutcome::Continue { emit } => out.push(emit),
                StopOutcome::Stopped { emit, stop } => {
                    out.push(emit);
                    return (out, Some(stop), String::new());
                }
            }
        }
        (out, None, m.finish())
    }

    #[test]
    fn stop_spanning_deltas() {
        let (out, stop, _) = run(&["</end>"], &["hello <", "/en", "d> more"]);
        assert_eq!(out, ["hello ", "", ""]);
        assert_eq!(stop, Some(0));
    }

    #[test]
    fn held_text_is_released_when_it_stops_matching() {
        let (out, stop, rest) = run(&["STOP"], &["a ST", "x", "ST"]);
        assert_eq!(out, ["a ", "STx", ""]);
        assert_eq!((stop, rest.as_str()), (None, "ST"));
    }

    #[test]
    fn earliest_stop_wins() {
        let (out, stop, _) = run(&["cd", "b"], &["abcd"]);
        assert_eq!((out.concat(), stop), ("a".to_owned(), Some(1)));
    }

    #[test]
    fn multibyte_prefixes() {
        let (out, stop, _) = run(&["世界"], &["你好世", "界!"]);
        assert_eq!((out, stop), (vec!["你好".to_owned(), String::new()], Some(0)));
    }

    #[test]
    fn too_many_stops() {
        let stops: Vec<String> = (0..33).map(|i| i.to_string()).collect();
        assert!(matches!(
            StopMatcher::new(stops),
            Err(Error::TooManyStopStrings { count: 33 })
        ));
    }
}
