//! Seeded, stratified selection of images.
//!
//! Randomness comes from BLAKE3 of (seed, index) rather than a PRNG stream: the order of an image
//! depends only on its own index, so splits never change with a `rand` upgrade, and a subset of n
//! per class is always a prefix of the subset of n+1 (a larger evaluation extends a smaller one,
//! so cached scores stay valid).

use std::collections::BTreeMap;

use crate::LabelId;

/// The pseudo-random sort key of image `index` under `seed`.
pub fn hash_order(seed: u64, index: usize) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"diffguard-split-v1");
    h.update(&seed.to_le_bytes());
    h.update(&(index as u64).to_le_bytes());
    let bytes = h.finalize();
    let mut key = [0u8; 8];
    key.copy_from_slice(&bytes.as_bytes()[..8]);
    u64::from_le_bytes(key)
}

/// The indices of each class, each list in seeded order.
pub(crate) fn classes_in_hash_order(
    labels: &[LabelId],
    seed: u64,
) -> BTreeMap<LabelId, Vec<usize>> {
    let mut by_class: BTreeMap<LabelId, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    for members in by_class.values_mut() {
        members.sort_by_key(|&i| (hash_order(seed, i), i));
    }
    by_class
}

/// `n` indices (all of them when `n ≥ labels.len()`), sorted ascending, chosen per class in
/// proportion to the class sizes (largest-remainder rounding, ties to the smaller label) and, within
/// a class, in the seeded order of [`hash_order`].
pub fn stratified_subset(labels: &[LabelId], n: usize, seed: u64) -> Vec<usize> {
    let total = labels.len();
    if n >= total {
        return (0..total).collect();
    }
    let by_class = classes_in_hash_order(labels, seed);
    // Exact integer shares: floor(n·c/total) plus one for the largest remainders.
    let mut quota: Vec<(LabelId, usize, usize)> = by_class
        .iter()
        .map(|(&l, m)| {
            let num = n * m.len();
            (l, num / total, num % total)
        })
        .collect();
    let assigned: usize = quota.iter().map(|q| q.1).sum();
    let mut order: Vec<usize> = (0..quota.len()).collect();
    order.sort_by(|&a, &b| {
        quota[b]
            .2
            .cmp(&quota[a].2)
            .then(quota[a].0.cmp(&quota[b].0))
    });
    for &k in order.iter().take(n - assigned) {
        quota[k].1 += 1;
    }
    let mut out: Vec<usize> = quota
        .iter()
        .flat_map(|&(l, q, _)| by_class[&l][..q].iter().copied())
        .collect();
    out.sort_unstable();
    out
}
