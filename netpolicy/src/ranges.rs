//! Sets of integers as sorted, disjoint, non-adjacent inclusive intervals.
//! Addresses (u32/u128 as u128) and ports (u16 as u128) use the same type.

/// A set of u128 values.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Ranges(Vec<(u128, u128)>);

impl Ranges {
    /// The empty set.
    pub const fn empty() -> Self {
        Self(Vec::new())
    }

    /// One interval (inclusive); empty if `lo > hi`.
    pub fn interval(lo: u128, hi: u128) -> Self {
        if lo > hi {
            Self::empty()
        } else {
            Self(vec![(lo, hi)])
        }
    }

    /// Builds a set from any intervals (merging overlaps and neighbours).
    pub fn from_intervals(mut v: Vec<(u128, u128)>) -> Self {
        v.retain(|(a, b)| a <= b);
        v.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
        for (a, b) in v {
            match out.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        Self(out)
    }

    /// The intervals.
    pub fn intervals(&self) -> &[(u128, u128)] {
        &self.0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `x` is in the set.
    /// Binary search: O(log n), no allocation.
    pub fn contains(&self, x: u128) -> bool {
        // The first interval ending at or after x is the only candidate.
        let i = self.0.partition_point(|&(_, b)| b < x);
        self.0.get(i).is_some_and(|&(a, _)| a <= x)
    }

    /// Appends an interval after the last one, merging if adjacent or
    /// overlapping (`lo` must not be below the last interval's start).
    pub(crate) fn push(&mut self, lo: u128, hi: u128) {
        debug_assert!(lo <= hi);
        match self.0.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => self.0.push((lo, hi)),
        }
    }

    /// Union.
    pub fn union(&self, other: &Self) -> Self {
        let mut v = self.0.clone();
        v.extend_from_slice(&other.0);
        Self::from_intervals(v)
    }

    /// Intersection.
    pub fn intersect(&self, other: &Self) -> Self {
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < self.0.len() && j < other.0.len() {
            let (a1, b1) = self.0[i];
            let (a2, b2) = other.0[j];
            let (lo, hi) = (a1.max(a2), b1.min(b2));
            if lo <= hi {
                out.push((lo, hi));
            }
            if b1 < b2 {
                i += 1;
            } else {
                j += 1;
            }
        }
        Self(out)
    }

    /// Difference `self - other`: one merge over both lists.
    pub fn subtract(&self, other: &Self) -> Self {
        let mut out = Vec::new();
        let mut j = 0;
        for &(a, b) in &self.0 {
            let mut lo = a;
            // Skip the intervals of `other` that end before this one starts.
            while j < other.0.len() && other.0[j].1 < lo {
                j += 1;
            }
            let mut k = j;
            let mut done = false;
            while k < other.0.len() && other.0[k].0 <= b {
                let (c, d) = other.0[k];
                if c > lo {
                    out.push((lo, c - 1));
                }
                if d >= b {
                    done = true;
                    break;
                }
                lo = d + 1;
                k += 1;
            }
            if !done {
                out.push((lo, b));
            }
        }
        Self(out)
    }

    /// The intervals as text: `80`, `8000-8080`.
    pub fn to_strings(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect()
    }

    /// Whether `self` is a subset of `other`.
    pub fn is_subset(&self, other: &Self) -> bool {
        // Each interval must lie inside one interval of `other` (they are
        // non-adjacent, so no interval spans two).
        let mut j = 0;
        self.0.iter().all(|&(a, b)| {
            while j < other.0.len() && other.0[j].1 < a {
                j += 1;
            }
            other.0.get(j).is_some_and(|&(c, d)| c <= a && b <= d)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(v: &[(u128, u128)]) -> Ranges {
        Ranges::from_intervals(v.to_vec())
    }

    fn arb() -> impl Strategy<Value = Ranges> {
        proptest::collection::vec((0u128..200, 0u128..20), 0..6)
            .prop_map(|v| Ranges::from_intervals(v.into_iter().map(|(a, l)| (a, a + l)).collect()))
    }

    #[test]
    fn merges_overlaps_and_neighbours() {
        assert_eq!(
            set(&[(5, 9), (1, 3), (4, 4), (20, 30), (25, 40)]).intervals(),
            &[(1, 9), (20, 40)]
        );
    }

    proptest! {
        #[test]
        fn set_algebra_matches_membership(a in arb(), b in arb(), x in 0u128..230) {
            prop_assert_eq!(a.union(&b).contains(x), a.contains(x) || b.contains(x));
            prop_assert_eq!(a.intersect(&b).contains(x), a.contains(x) && b.contains(x));
            prop_assert_eq!(a.subtract(&b).contains(x), a.contains(x) && !b.contains(x));
            prop_assert_eq!(a.is_subset(&b), a.subtract(&b).is_empty());
            prop_assert_eq!(a.is_subset(&b), (0u128..230).all(|y| !a.contains(y) || b.contains(y)));
            let mut pushed = Ranges::empty();
            for &(lo, hi) in a.intervals() {
                pushed.push(lo, hi);
            }
            prop_assert_eq!(&pushed, &a);
        }
    }
}
