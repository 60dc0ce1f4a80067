//! Bounded string interning for flow names and dimension values: a million open instances
//! of one flow share one allocation for its name. Past `capacity` distinct strings, new
//! ones are no longer remembered (still correct, only not shared), so a flood of unique
//! values cannot grow the interner without bound.

use std::hash::Hash;
use std::sync::{Arc, RwLock};

// foldhash (runs for every event): flow names and label values come from the exporters, but the set is bounded
// (`capacity`) and a collision flood only slows interning, not the service.
use hashbrown::HashSet;

/// Interns `Arc<T>` values: strings, and the dimension-value lists of instances.
pub struct Interner<T: ?Sized = str> {
    strings: RwLock<HashSet<Arc<T>>>,
    capacity: usize,
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    /// Shares `value` with an equal one seen before, else remembers it (while there is
    /// room).
    pub fn share(&self, value: Arc<T>) -> Arc<T> {
        if let Some(found) = self.strings.read().expect("interner lock").get(&value) {
            return found.clone();
        }
        let mut set = self.strings.write().expect("interner lock");
        if let Some(found) = set.get(&value) {
            return found.clone();
        }
        if set.len() < self.capacity {
            set.insert(value.clone());
        }
        value
    }

    /// Values remembered now.
    pub fn len(&self) -> usize {
        self.strings.read().expect("interner lock").len()
    }

    /// Nothing remembered yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: ?Sized> Interner<T> {
    /// Remembers at most `capacity` values; beyond, values pass through unshared.
    pub fn new(capacity: usize) -> Self {
        Self {
            strings: RwLock::new(HashSet::new()),
            capacity,
        }
    }
}

impl Interner<str> {
    /// Like [`share`](Self::share), allocating only for a string not seen before.
    pub fn intern(&self, s: &str) -> Arc<str> {
        if let Some(found) = self.strings.read().expect("interner lock").get(s) {
            return found.clone();
        }
        let mut strings = self.strings.write().expect("interner lock");
        if let Some(found) = strings.get(s) {
            return found.clone();
        }
        let fresh: Arc<str> = Arc::from(s);
        if strings.len() < self.capacity {
            strings.insert(fresh.clone());
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_stays_bounded() {
        let i = Interner::new(2);
        let a = i.intern("a");
        assert!(Arc::ptr_eq(&a, &i.intern("a")));
        i.intern("b");
        let c1 = i.intern("c");
        let c2 = i.intern("c");
        assert_eq!(&*c1, "c");
        assert!(!Arc::ptr_eq(&c1, &c2));
        assert_eq!(i.len(), 2);
    }
}
