//! First in, first out: blocks leave in the order they came, whatever their use since.

use super::list::LinkedMap;
use super::{Key, Millis, Policy};

#[derive(Debug, Default)]
pub struct Fifo {
    /// Oldest insertion at the front.
    order: LinkedMap<()>,
}

impl Fifo {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Policy for Fifo {
    fn name(&self) -> &'static str {
        "fifo"
    }

    fn insert(&mut self, key: Key, _parent: Option<Key>, _now: Millis) {
        self.order.push_back(key, ());
    }

    fn touch(&mut self, _key: Key, _now: Millis) {}

    fn remove(&mut self, key: Key) {
        self.order.remove(key);
    }

    fn victim(&mut self, _now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        self.order.remove_first(|k, _| evictable(k))
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_in_arrival_order_whatever_the_use() {
        let mut p = Fifo::new();
        for k in 1..=3 {
            p.insert(k, None, 0);
        }
        p.touch(1, 1);
        assert_eq!(p.victim(2, &mut |k| k != 1), Some(2));
        assert_eq!(p.victim(2, &mut |_| true), Some(1));
        assert_eq!(p.victim(2, &mut |_| false), None);
        assert_eq!(p.len(), 1);
    }
}
