//! What this process already delivered of the batch it is working on.
//!
//! PgQ hands out the same batch until it is finished, so after a reconnect the worker
//! reads the whole batch again. [`BatchProgress`] remembers which events RabbitMQ already
//! confirmed, so they are not published a second time.

/// A set of event ids, stored as sorted, disjoint, inclusive ranges.
///
/// Events are published in `ev_id` order and mostly confirmed in that order, so the set
/// is usually a handful of ranges whatever the batch size: inserting the next id extends
/// the last range in O(1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EvIdSet {
    ranges: Vec<(i64, i64)>,
}

impl EvIdSet {
    /// Adds `id`.
    pub fn insert(&mut self, id: i64) {
        if let Some(last) = self.ranges.last_mut() {
            if id >= last.0 && id <= last.1 {
                return;
            }
            if id > last.1 {
                if last.1.checked_add(1) == Some(id) {
                    last.1 = id;
                } else {
                    self.ranges.push((id, id));
                }
                return;
            }
        } else {
            self.ranges.push((id, id));
            return;
        }
        self.insert_out_of_order(id);
    }

    fn insert_out_of_order(&mut self, id: i64) {
        // First range that ends at or after `id`.
        let index = self.ranges.partition_point(|&(_, end)| end < id);
        if let Some(&(start, _)) = self.ranges.get(index)
            && start <= id
        {
            return;
        }
        let joins_previous = index > 0 && self.ranges[index - 1].1.checked_add(1) == Some(id);
        let joins_next = self
            .ranges
            .get(index)
            .is_some_and(|&(start, _)| id.checked_add(1) == Some(start));
        match (joins_previous, joins_next) {
            (true, true) => {
                self.ranges[index - 1].1 = self.ranges[index].1;
                self.ranges.remove(index);
            }
            (true, false) => self.ranges[index - 1].1 = id,
            (false, true) => self.ranges[index].0 = id,
            (false, false) => self.ranges.insert(index, (id, id)),
        }
    }

    /// True when `id` was added.
    pub fn contains(&self, id: i64) -> bool {
        let index = self.ranges.partition_point(|&(_, end)| end < id);
        self.ranges.get(index).is_some_and(|&(start, _)| start <= id)
    }

    /// Number of ids in the set.
    pub fn len(&self) -> u64 {
        self.ranges
            .iter()
            .map(|&(start, end)| end.abs_diff(start) + 1)
            .sum()
    }

    /// True when the set holds no id.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ids as sorted, disjoint, inclusive ranges.
    pub fn ranges(&self) -> &[(i64, i64)] {
        &self.ranges
    }
}

/// Progress on one batch, kept across reconnects within the process.
#[derive(Debug, Default)]
pub struct BatchProgress {
    batch_id: Option<i64>,
    confirmed: EvIdSet,
}

impl BatchProgress {
    /// Starts (or resumes) `batch_id`. Progress on another batch is forgotten: that batch
    /// was finished, so it can never come back.
    pub fn start(&mut self, batch_id: i64) {
        if self.batch_id != Some(batch_id) {
            self.batch_id = Some(batch_id);
            self.confirmed = EvIdSet::default();
        }
    }

    /// Records that RabbitMQ confirmed `ev_id`.
    pub fn confirmed(&mut self, ev_id: i64) {
        self.confirmed.insert(ev_id);
    }

    /// True when `ev_id` was confirmed earlier in this batch.
    pub fn is_confirmed(&self, ev_id: i64) -> bool {
        self.confirmed.contains(ev_id)
    }

    /// Every event of the batch confirmed so far.
    pub fn confirmed_ids(&self) -> &EvIdSet {
        &self.confirmed
    }

    /// The batch was finished: nothing to remember.
    pub fn finished(&mut self) {
        self.batch_id = None;
        self.confirmed = EvIdSet::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn in_order_ids_stay_one_range() {
        let mut set = EvIdSet::default();
        for id in 1..=200_000 {
            set.insert(id);
        }
        assert_eq!(set.ranges, [(1, 200_000)]);
        assert_eq!(set.len(), 200_000);
        assert!(set.contains(1) && set.contains(200_000) && !set.contains(0) && !set.contains(200_001));
    }

    #[test]
    fn gaps_and_late_ids_merge() {
        let mut set = EvIdSet::default();
        for id in [1, 2, 5, 6, 3, 4, 10] {
            set.insert(id);
        }
        assert_eq!(set.ranges, [(1, 6), (10, 10)]);
    }

    #[test]
    fn extreme_ids_do_not_overflow() {
        let mut set = EvIdSet::default();
        set.insert(i64::MAX);
        set.insert(i64::MIN);
        set.insert(i64::MAX - 1);
        assert!(set.contains(i64::MAX) && set.contains(i64::MIN) && set.contains(i64::MAX - 1));
        assert_eq!(set.len(), 3);
    }

    #[test]
    fn progress_resets_for_a_new_batch_only() {
        let mut progress = BatchProgress::default();
        progress.start(7);
        progress.confirmed(100);
        progress.start(7);
        assert!(progress.is_confirmed(100));
        progress.start(8);
        assert!(!progress.is_confirmed(100));
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(ids in prop::collection::vec(-50i64..50, 0..200)) {
            let mut set = EvIdSet::default();
            let mut model = BTreeSet::new();
            for id in ids {
                set.insert(id);
                model.insert(id);
            }
            for probe in -60..60 {
                prop_assert_eq!(set.contains(probe), model.contains(&probe));
            }
            prop_assert_eq!(set.len(), model.len() as u64);
            prop_assert!(set.ranges.windows(2).all(|w| w[0].1 + 1 < w[1].0), "ranges stay disjoint and apart");
        }
    }
}
