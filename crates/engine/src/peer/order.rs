//! The order in which a node fetches a whole file (background prefetch,
//! warm, preload): first the chunks it owns, in file order, then all the
//! others from a starting point of its own, wrapping around. Nodes that all
//! swept from chunk 0 would, when a fleet starts at once, all ask the same
//! few owners at the same time while every other uplink idles. Starting
//! apart spreads the asks over all owners, and owning first brings each
//! chunk from the origin early, once, before most others ask for it.

/// A permutation of `0..n`: the chunks `owned` says are this node's, then
/// the rest from `start % n` on.
pub fn sweep(n: u64, owned: impl Fn(u64) -> bool, start: u64) -> Vec<u64> {
    let mine: Vec<bool> = (0..n).map(owned).collect();
    let mut order: Vec<u64> = (0..n).filter(|&i| mine[i as usize]).collect();
    let start = start.checked_rem(n).unwrap_or(0);
    order.extend(
        (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| !mine[i as usize]),
    );
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_first_then_the_rest_from_the_start_wrapping() {
        let o = sweep(8, |i| i % 3 == 0, 5);
        assert_eq!(o, vec![0, 3, 6, 5, 7, 1, 2, 4]);
        assert_eq!(sweep(4, |_| false, 6), vec![2, 3, 0, 1]);
        assert_eq!(sweep(3, |_| true, 1), vec![0, 1, 2]);
        assert!(sweep(0, |_| false, 7).is_empty());
    }

    #[test]
    fn is_a_permutation_for_any_start() {
        for start in 0..40 {
            let mut o = sweep(13, |i| i % 4 == 1, start);
            o.sort_unstable();
            assert_eq!(o, (0..13).collect::<Vec<_>>());
        }
    }
}
