//! Stop strings: text is released only once it can no longer turn into one, so a client
//! never sees the beginning of a stop string that a later token completes.

/// Holds back the tail of the generated text that could still become a stop string.
#[derive(Debug)]
pub(crate) struct StopStrings {
    stops: Vec<String>,
    held: String,
}

/// What [`StopStrings::push`] lets out.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Released {
    /// Safe to send now.
    pub(crate) text: String,
    /// A stop string completed: `text` ends where it began, and generation must end.
    pub(crate) stopped: bool,
}

impl StopStrings {
    /// `stops` must not contain the empty string (validation refuses it).
    pub(crate) fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> Released {
        if self.stops.is_empty() {
            return Released {
                text: text.to_owned(),
                stopped: false,
            };
        }
        self.held.push_str(text);
        // Everything before `held` was released because no stop string could start there,
        // so the first match, if any, starts inside `held`.
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first {
            self.held.truncate(at);
            return Released {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep = self.longest_partial_suffix();
        let text = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        Released { text, stopped: false }
    }

    /// The held text, when generation ends for another reason.
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop string.
    fn longest_partial_suffix(&self) -> usize {
        let held = self.held.as_str();
        let mut best = 0;
        for stop in &self.stops {
            let max = (stop.len() - 1).min(held.len());
            // Longest first; the first that fits wins for this stop string.
            for len in (best + 1..=max).rev() {
                let start = held.len() - len;
                if held.is_char_boundary(start) && stop.starts_with(&held[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let r = s.push(p);
            out.push(r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push(s.finish());
        (out, false)
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_held_then_dropped() {
        let (out, stopped) = run(&["END"], &["hello E", "N", "D more"]);
        assert!(stopped);
        assert_eq!(out, ["hello ", "", ""]);
    }

    #[test]
    fn a_false_start_is_released_when_it_cannot_match() {
        let (out, stopped) = run(&["END"], &["a E", "NX", "b"]);
        assert!(!stopped);
        assert_eq!(out, ["a ", "ENX", "b", ""]);
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let (out, stopped) = run(&["world", "lo"], &["hello world"]);
        assert!(stopped);
        assert_eq!(out, ["hel"]);
    }

    #[test]
    fn multibyte_text_is_split_only_on_character_boundaries() {
        let (out, stopped) = run(&["é!"], &["café", "é", "?"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "caféé?");
        let (out, stopped) = run(&["é!"], &["café", "!"]);
        assert!(stopped);
        assert_eq!(out.concat(), "caf");
    }

    proptest! {
        #[test]
        fn released_text_never_contains_a_stop_and_nothing_is_lost(
            pieces in proptest::collection::vec("[ab ]{0,4}", 0..12),
            stops in proptest::collection::vec("[ab]{1,3}", 1..4),
        ) {
            let stop_refs: Vec<&str> = stops.iter().map(String::as_str).collect();
            let piece_refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let (out, stopped) = run(&stop_refs, &piece_refs);
            let released = out.concat();
            let input = pieces.concat();
            for s in &stops {
                prop_assert!(!released.contains(s.as_str()), "{released:?} contains {s:?}");
            }
            // Stopping happens at the first piece after which the text contains a stop
            // string, at the earliest place one starts.
            let mut expected = None;
            for k in 0..pieces.len() {
                let text = pieces[..=k].concat();
                if let Some(at) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
                    expected = Some(text[..at].to_owned());
                    break;
                }
            }
            match expected {
                Some(e) => { prop_assert!(stopped); prop_assert_eq!(released, e); }
                None => { prop_assert!(!stopped); prop_assert_eq!(released, input); }
            }
        }
    }
}
