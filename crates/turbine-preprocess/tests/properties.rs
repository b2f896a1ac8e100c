//! Properties of the byte-level detokenizer and of stop-string matching, on random input.

use proptest::prelude::*;
use turbine_preprocess::{IncrementalDecoder, StopMatcher, StopOutcome, Tokenizer};

proptest! {
    #[test]
    fn byte_stream_equals_one_shot_decode(
        ids in prop::collection::vec(prop_oneof![0u32..256, 0xc0u32..0x100, 0x80u32..0xc0, 250u32..300], 0..60),
        chunk in 1usize..5,
    ) {
        let t = Tokenizer::bytes();
        let whole = t.decode(&ids, false).unwrap();
        let mut d = IncrementalDecoder::new(t, false);
        let mut pieces: Vec<String> = ids.chunks(chunk).map(|c| d.push(c).unwrap()).collect();
        pieces.push(d.finish().unwrap());
        prop_assert_eq!(pieces.concat(), whole.clone());
        let inserted = pieces.iter().map(|s| s.matches(char::REPLACEMENT_CHARACTER).count()).sum::<usize>();
        prop_assert_eq!(inserted, whole.matches(char::REPLACEMENT_CHARACTER).count());
    }

    #[test]
    fn byte_stream_of_text_never_splits_characters(text in "\\PC{0,30}") {
        let t = Tokenizer::bytes();
        let mut d = IncrementalDecoder::new(t.clone(), false);
        for id in t.encode(&text, false).unwrap() {
            let piece = d.push(&[id]).unwrap();
            prop_assert!(!piece.contains(char::REPLACEMENT_CHARACTER) || text.contains(char::REPLACEMENT_CHARACTER));
        }
    }

    /// Small alphabets make stop strings, and near misses, frequent.
    #[test]
    fn stop_matcher_against_a_naive_search(
        stops in prop::collection::vec("[ab日]{1,4}", 1..4),
        deltas in prop::collection::vec("[ab日c]{0,5}", 0..8),
    ) {
        let input: String = deltas.concat();
        let mut m = StopMatcher::new(stops.clone()).unwrap();
        let mut emitted = String::new();
        let mut stopped = None;
        for d in &deltas {
            match m.push(d) {
                StopOutcome::Continue { emit } => emitted.push_str(&emit),
                StopOutcome::Stopped { emit, stop } => {
                    emitted.push_str(&emit);
                    stopped = Some(stop);
                    break;
                }
            }
            let so_far = emitted.clone() + m.held();
            prop_assert!(input.starts_with(&so_far), "{:?} is not a prefix of {:?}", so_far, input);
        }
        for s in &stops {
            prop_assert!(!emitted.contains(s.as_str()), "{:?} emitted in {:?}", s, emitted);
        }
        // The naive answer: the first delta after which the text so far holds a stop string
        // stops the stream, cut at the earliest occurrence in that text.
        let mut so_far = String::new();
        let mut first = None;
        for d in &deltas {
            so_far.push_str(d);
            first = stops.iter().enumerate().filter_map(|(i, s)| so_far.find(s.as_str()).map(|at| (at, i))).min();
            if first.is_some() {
                break;
            }
        }
        match (first, stopped) {
            (Some((at, _)), Some(i)) => {
                prop_assert_eq!(&emitted, &input[..at]);
                prop_assert!(input[at..].starts_with(stops[i].as_str()));
            }
            (None, None) => {
                emitted.push_str(&m.finish());
                prop_assert_eq!(emitted, input);
            }
            (first, stopped) => prop_assert!(false, "naive {:?}, matcher {:?}", first, stopped),
        }
    }
}
