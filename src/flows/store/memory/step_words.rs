//! What a recorded step costs in the moka store (docs/behaviour.md §9): step names and
//! start-dimension lists are numbered once per store, so an open instance with steps is
//! one boxed run of words ([`Words`]): its start, its dimension list's number and its
//! step count, each step's timestamp, and the steps' numbers four to a word. Four steps:
//! seven words, 56 bytes in one allocation.
//!
//! When a number cannot be given (a table is full), the instance keeps its steps by
//! name ([`Stepped`] behind a shared pointer): the same rules, only larger.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use foldhash::fast::RandomState;

use super::steps::{StepAt, Stepped};
use crate::flows::event::DimValues;

/// Words before the timestamps: the start, then (dimension list number | count << 32).
const HEAD: usize = 2;
/// Step numbers (u16) per word.
const PER_WORD: usize = 4;

/// How many names and lists the store numbers at most.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NumberingLimits {
    pub flows: usize,
    pub steps_per_flow: usize,
    /// Step names of all flows together: names of flows whose steps the extractor does
    /// not bound (past its flow limit) cannot grow the table without end.
    pub steps: usize,
    pub dim_lists: usize,
}

impl Default for NumberingLimits {
    fn default() -> Self {
        Self {
            flows: 1 << 16,
            // `limits.max_steps_per_flow` is at most 1024; a flow whose names are not
            // kept by the extractor can bring more.
            steps_per_flow: usize::from(u16::MAX),
            steps: 1 << 18,
            dim_lists: 1 << 16,
        }
    }
}

/// The numbers of step names (per flow) and of start-dimension lists. Numbers are never
/// reused: the tables only grow, up to their limits.
#[derive(Default)]
pub(crate) struct Numbering {
    steps: RwLock<StepNames>,
    dims: RwLock<DimLists>,
    limits: NumberingLimits,
}

#[derive(Default)]
struct StepNames {
    per_flow: HashMap<Arc<str>, Vec<Arc<str>>, RandomState>,
    count: usize,
}

#[derive(Default)]
struct DimLists {
    lists: Vec<DimValues>,
    numbers: HashMap<DimValues, u32, RandomState>,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl Numbering {
    #[cfg(test)]
    pub fn with_limits(limits: NumberingLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// The number of `step` in `flow`, given now if it has none; `None`: no room.
    pub fn step_number(&self, flow: &Arc<str>, step: &Arc<str>) -> Option<u16> {
        let find = |names: &[Arc<str>]| {
            names
                .iter()
                .position(|n| Arc::ptr_eq(n, step) || **n == **step)
                .and_then(|i| u16::try_from(i).ok())
        };
        let known = read(&self.steps)
            .per_flow
            .get(&**flow)
            .and_then(|n| find(n));
        if known.is_some() {
            return known;
        }
        let mut steps = write(&self.steps);
        let StepNames { per_flow, count } = &mut *steps;
        let room_for_flow = per_flow.len() < self.limits.flows;
        let names = match per_flow.get_mut(&**flow) {
            Some(names) => names,
            None if room_for_flow => per_flow.entry(flow.clone()).or_default(),
            None => return None,
        };
        if let Some(number) = find(names) {
            return Some(number);
        }
        let number = u16::try_from(names.len()).ok()?;
        if names.len() >= self.limits.steps_per_flow || *count >= self.limits.steps {
            return None;
        }
        names.push(step.clone());
        *count += 1;
        Some(number)
    }

    fn step_name(&self, flow: &str, number: u16) -> Arc<str> {
        read(&self.steps)
            .per_flow
            .get(flow)
            .and_then(|names| names.get(usize::from(number)))
            .cloned()
            .unwrap_or_else(|| Arc::from(""))
    }

    /// The number of a start-dimension list, given now if it has none; `None`: no room.
    fn dims_number(&self, dims: &DimValues) -> Option<u32> {
        if let Some(&number) = read(&self.dims).numbers.get(dims) {
            return Some(number);
        }
        let mut table = write(&self.dims);
        if let Some(&number) = table.numbers.get(dims) {
            return Some(number);
        }
        if table.lists.len() >= self.limits.dim_lists {
            return None;
        }
        let number = u32::try_from(table.lists.len()).ok()?;
        table.lists.push(dims.clone());
        table.numbers.insert(dims.clone(), number);
        Some(number)
    }

    /// The start dimensions of an instance held as words.
    pub fn dims(&self, words: &Words) -> DimValues {
        read(&self.dims)
            .lists
            .get(words.dims_number() as usize)
            .cloned()
            .unwrap_or_else(|| Arc::from([]))
    }

    /// `open` as words, or `None` when a name or its dimensions cannot be numbered.
    pub fn encode(&self, flow: &Arc<str>, open: &Stepped) -> Option<Words> {
        let dims = self.dims_number(&open.dims)?;
        let steps = open
            .steps
            .iter()
            .map(|s| Some((self.step_number(flow, &s.step)?, s.timestamp_nanos)))
            .collect::<Option<Vec<_>>>()?;
        Words::build(open.start_nanos, dims, &steps)
    }

    /// An instance held as words, by name.
    pub fn decode(&self, flow: &str, words: &Words) -> Stepped {
        Stepped {
            start_nanos: words.start_nanos(),
            dims: self.dims(words),
            steps: words
                .steps()
                .map(|(number, timestamp_nanos)| StepAt {
                    step: self.step_name(flow, number),
                    timestamp_nanos,
                })
                .collect(),
        }
    }
}

/// An open instance with steps, by number (see the module's documentation).
#[derive(Debug, Clone)]
pub(crate) struct Words(Box<[u64]>);

impl Words {
    fn build(start_nanos: u64, dims: u32, steps: &[(u16, u64)]) -> Option<Self> {
        let count = u16::try_from(steps.len()).ok()?;
        let mut words = Vec::with_capacity(HEAD + steps.len() + steps.len().div_ceil(PER_WORD));
        words.push(start_nanos);
        words.push(header(dims, count));
        words.extend(steps.iter().map(|&(_, t)| t));
        for group in steps.chunks(PER_WORD) {
            let packed = group
                .iter()
                .enumerate()
                .fold(0u64, |w, (i, &(n, _))| w | u64::from(n) << (16 * i));
            words.push(packed);
        }
        Some(Self(words.into()))
    }

    pub fn start_nanos(&self) -> u64 {
        self.0[0]
    }

    fn dims_number(&self) -> u32 {
        self.0[1] as u32
    }

    fn count(&self) -> usize {
        usize::from((self.0[1] >> 32) as u16)
    }

    /// (number, timestamp) of each step, in arrival order.
    fn steps(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        let count = self.count();
        let numbers = &self.0[HEAD + count..];
        self.0[HEAD..HEAD + count]
            .iter()
            .enumerate()
            .map(move |(i, &t)| ((numbers[i / PER_WORD] >> (16 * (i % PER_WORD))) as u16, t))
    }

    /// The same instance started at `start_nanos`.
    pub fn with_start(&self, start_nanos: u64) -> Self {
        let mut words = self.0.clone();
        words[0] = start_nanos;
        Self(words)
    }

    /// With step `number` added, or the earlier timestamp kept for one already there
    /// (`false`: a duplicate). `None`: no room for another step.
    pub fn with_step(&self, number: u16, timestamp_nanos: u64) -> Option<(Self, bool)> {
        match self.steps().position(|(n, _)| n == number) {
            Some(i) => {
                let mut words = self.0.clone();
                words[HEAD + i] = words[HEAD + i].min(timestamp_nanos);
                Some((Self(words), false))
            }
            // Built straight from these words, as `build` lays them out: the new
            // timestamp after the others, its number in the next free lane.
            None => {
                let count = self.count();
                let grown = u16::try_from(count + 1).ok()?;
                let numbers = &self.0[HEAD + count..];
                let lane = count % PER_WORD;
                let mut words =
                    Vec::with_capacity(HEAD + count + 1 + numbers.len() + usize::from(lane == 0));
                words.push(self.start_nanos());
                words.push(header(self.dims_number(), grown));
                words.extend_from_slice(&self.0[HEAD..HEAD + count]);
                words.push(timestamp_nanos);
                words.extend_from_slice(numbers);
                match words.last_mut() {
                    Some(last) if lane != 0 => *last |= u64::from(number) << (16 * lane),
                    _ => words.push(u64::from(number)),
                }
                Some((Self(words.into()), true))
            }
        }
    }
}

/// The second word: the dimension list's number, and the step count above it.
fn header(dims: u32, count: u16) -> u64 {
    u64::from(dims) | u64::from(count) << 32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stepped(steps: &[(&str, u64)]) -> Stepped {
        Stepped {
            start_nanos: 7,
            dims: Arc::from([Arc::from("eu")]),
            steps: steps
                .iter()
                .map(|&(s, t)| StepAt {
                    step: Arc::from(s),
                    timestamp_nanos: t,
                })
                .collect(),
        }
    }

    fn names(s: &Stepped) -> Vec<(String, u64)> {
        s.steps
            .iter()
            .map(|s| (s.step.to_string(), s.timestamp_nanos))
            .collect()
    }

    #[test]
    fn four_steps_are_seven_words_and_read_back_in_arrival_order() {
        let n = Numbering::default();
        let flow: Arc<str> = Arc::from("order");
        let open = stepped(&[("shipped", 9), ("paid", 3), ("packed", 5), ("placed", 1)]);
        let words = n.encode(&flow, &open).unwrap();
        assert_eq!(words.0.len(), 7);
        let back = n.decode("order", &words);
        assert_eq!((back.start_nanos, &*back.dims[0]), (7, "eu"));
        assert_eq!(names(&back), names(&open));
    }

    #[test]
    fn a_known_step_keeps_its_earliest_time_and_a_new_one_is_appended() {
        let n = Numbering::default();
        let flow: Arc<str> = Arc::from("order");
        let words = n.encode(&flow, &stepped(&[("paid", 5)])).unwrap();
        let paid = n.step_number(&flow, &Arc::from("paid")).unwrap();
        let (same, new) = words.with_step(paid, 3).unwrap();
        assert!(!new);
        let packed = n.step_number(&flow, &Arc::from("packed")).unwrap();
        let (more, new) = same.with_step(packed, 8).unwrap();
        assert!(new);
        assert_eq!(
            names(&n.decode("order", &more.with_start(2))),
            [("paid".to_string(), 3), ("packed".to_string(), 8)]
        );
        assert_eq!(more.with_start(2).start_nanos(), 2);
    }

    #[test]
    fn an_appended_step_is_laid_out_as_built() {
        let mut steps: Vec<(u16, u64)> = Vec::new();
        let mut words = Words::build(7, 3, &steps).unwrap();
        for n in 0..11u16 {
            let (more, new) = words.with_step(n * 3 + 1, 100 + u64::from(n)).unwrap();
            assert!(new);
            steps.push((n * 3 + 1, 100 + u64::from(n)));
            assert_eq!(more.0, Words::build(7, 3, &steps).unwrap().0, "{n}");
            words = more;
        }
    }

    #[test]
    fn numbers_are_per_flow_and_run_out_at_the_limits() {
        let n = Numbering::with_limits(NumberingLimits {
            flows: 2,
            steps_per_flow: 2,
            steps: 3,
            dim_lists: 1,
        });
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        assert_eq!(n.step_number(&a, &Arc::from("x")), Some(0));
        assert_eq!(n.step_number(&a, &Arc::from("y")), Some(1));
        assert_eq!(n.step_number(&a, &Arc::from("z")), None, "per flow");
        assert_eq!(n.step_number(&a, &Arc::from("x")), Some(0));
        assert_eq!(n.step_number(&b, &Arc::from("x")), Some(0));
        assert_eq!(n.step_number(&b, &Arc::from("y")), None, "all flows");
        assert_eq!(
            n.step_number(&Arc::from("c"), &Arc::from("x")),
            None,
            "flows"
        );
        assert!(n.encode(&a, &stepped(&[("x", 1)])).is_some());
        let mut other = stepped(&[("x", 1)]);
        other.dims = Arc::from([Arc::from("us")]);
        assert!(n.encode(&a, &other).is_none(), "dimension lists");
    }
}
