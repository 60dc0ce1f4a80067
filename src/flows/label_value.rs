//! Label values taken from client data are bounded (docs/behaviour.md §4): cut at a UTF-8
//! boundary to at most `limits.max_label_value_bytes` bytes, and each cut counted per
//! label name. With the series limit this bounds the exposition: at most
//! `max_series_per_metric` × labels × this bound of label text per family.
//!
//! The counts are plain atomics, one per configured label name (so bounded by the
//! configuration), touched only when a value is cut.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How many values of each label were cut.
#[derive(Debug, Default)]
pub struct LabelCuts {
    labels: Box<[Box<str>]>,
    counts: Box<[AtomicU64]>,
}

impl LabelCuts {
    /// One count per distinct label name.
    pub fn new<'a>(labels: impl IntoIterator<Item = &'a str>) -> Self {
        let mut names: Vec<Box<str>> = Vec::new();
        for label in labels {
            if !names.iter().any(|n| &**n == label) {
                names.push(label.into());
            }
        }
        let counts = names.iter().map(|_| AtomicU64::new(0)).collect();
        Self {
            labels: names.into(),
            counts,
        }
    }

    /// Where `label` is counted (`None`: not one of the labels given).
    fn slot(&self, label: &str) -> Option<usize> {
        self.labels.iter().position(|n| &**n == label)
    }

    /// Each label with at least one cut, and its count.
    pub fn for_each_cut(&self, mut f: impl FnMut(&str, u64)) {
        for (label, count) in self.labels.iter().zip(self.counts.iter()) {
            let n = count.load(Ordering::Relaxed);
            if n > 0 {
                f(label, n);
            }
        }
    }

    /// No label has had a value cut.
    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|c| c.load(Ordering::Relaxed) == 0)
    }
}

/// The bound and where cuts are counted; one per extraction path.
#[derive(Debug, Clone)]
pub struct LabelBound {
    max_bytes: usize,
    cuts: Arc<LabelCuts>,
}

/// Counts a cut of one label's values (a label not known to the counts is cut, not
/// counted).
#[derive(Debug, Clone, Copy)]
pub struct CutSlot(Option<usize>);

impl LabelBound {
    /// Values cut to at most `max_bytes` (at least 1), cuts counted in `cuts`.
    pub fn new(max_bytes: usize, cuts: Arc<LabelCuts>) -> Self {
        Self {
            max_bytes: max_bytes.max(1),
            cuts,
        }
    }

    /// Where cuts of `label`'s values are counted.
    pub fn slot(&self, label: &str) -> CutSlot {
        CutSlot(self.cuts.slot(label))
    }

    /// `value`, cut to at most the bound at a character boundary; a cut is counted.
    #[inline]
    pub fn apply<'v>(&self, slot: CutSlot, value: &'v str) -> &'v str {
        if value.len() <= self.max_bytes {
            return value;
        }
        if let Some(i) = slot.0 {
            self.cuts.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        cut_at_char_boundary(value, self.max_bytes)
    }
}

/// The longest prefix of `value` of at most `max_bytes` bytes that ends on a character.
pub fn cut_at_char_boundary(value: &str, max_bytes: usize) -> &str {
    if value.len() <= max_bytes {
        return value;
    }
    // A UTF-8 character is at most 4 bytes: at most 3 steps back.
    let mut end = max_bytes;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_a_character_boundary_and_counts_per_label() {
        let cuts = Arc::new(LabelCuts::new(["service", "region", "service"]));
        let bound = LabelBound::new(4, cuts.clone());
        let (service, region) = (bound.slot("service"), bound.slot("region"));
        assert_eq!(bound.apply(service, "shop"), "shop");
        assert!(cuts.is_empty());
        assert_eq!(bound.apply(service, "shopping"), "shop");
        // "aé€": 1 + 2 + 3 bytes; 4 bytes end inside the euro sign.
        assert_eq!(bound.apply(region, "aé€"), "aé");
        assert_eq!(bound.apply(region, "€€"), "€");
        assert_eq!(bound.apply(bound.slot("other"), "toolong"), "tool");
        let mut seen = Vec::new();
        cuts.for_each_cut(|label, n| seen.push((label.to_string(), n)));
        assert_eq!(seen, [("service".into(), 1), ("region".into(), 2)]);
        assert_eq!(cut_at_char_boundary("€", 1), "");
    }
}
