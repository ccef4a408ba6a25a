//! The append-only Merkle audit log of RFC 6962 (Certificate Transparency), section 2.1.
//!
//! Why RFC 6962 and not a home-grown tree: its tree hash, audit paths and consistency
//! proofs are what every transparency-log client already knows how to check, so an auditor
//! outside the consortium can verify our log with off-the-shelf code. The leaf and interior
//! hashes carry distinct prefixes (0x00 and 0x01) so a leaf can never be passed off as an
//! interior node, and the tree shape is fixed by the size alone, so the root commits to both
//! the contents and the order of every entry.
//!
//! Storage model: the log stores the hash of every *perfect* (complete) subtree, addressed as
//! `(level, index)` = MTH of leaves `[index·2^level, (index+1)·2^level)`; level 0 holds the leaf
//! hashes. Those nodes never change once complete, so a store only ever appends. Every subtree
//! the RFC recursion asks for starts at a position aligned to a power of two at least as large
//! as the subtree (left children are always perfect), so it splits into at most ⌈log₂ n⌉
//! stored perfect nodes: roots and proofs read O(log n) nodes and never re-hash the log.
//!
//! Generators ([`root`], [`inclusion_proof`], [`consistency_proof`]) read through
//! [`NodeSource`] and fail with [`MerkleError`] if the store lacks a node. Verifiers
//! ([`verify_inclusion`], [`verify_consistency`]) trust nothing: they take sizes, roots and
//! proofs from whoever presents them and return a [`ProofError`] saying what is wrong.

use std::convert::Infallible;

use crate::hash::Hash;

/// The hash of one log entry: SHA-256(0x00 || data).
///
/// The 0x00 prefix separates leaves from interior nodes (0x01), so no interior node can be
/// presented as a leaf (second-preimage resistance of the tree).
pub fn leaf_hash(data: &[u8]) -> Hash {
    Hash::digest_parts(&[&[0x00], data])
}

/// The hash of an interior node: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    Hash::digest_parts(&[&[0x01], &left.0, &right.0])
}

/// The root of the empty log: SHA-256 of the empty string, as RFC 6962 defines MTH({}).
pub fn empty_root() -> Hash {
    Hash::digest(&[])
}

/// Read access to the stored perfect-subtree hashes of a log.
///
/// `node(level, index)` is the MTH of leaves `[index·2^level, (index+1)·2^level)`. The
/// functions of this module only ask for subtrees that are complete within the size they
/// were given; `None` means the store does not have it, which they report as
/// [`MerkleError::MissingNode`] rather than guessing.
pub trait NodeSource {
    fn node(&self, level: u32, index: u64) -> Option<Hash>;
}

impl<T: NodeSource + ?Sized> NodeSource for &T {
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        (**self).node(level, index)
    }
}

/// Why a root or proof could not be produced from a store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    #[error(
        "the Merkle store has no node at level {level}, index {index}: \
         the store is incomplete or does not hold a log of the requested size"
    )]
    MissingNode { level: u32, index: u64 },
    #[error("leaf index {index} is out of range for a log of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("cannot prove consistency from size {old_size} to the smaller size {new_size}")]
    OldSizeExceedsNew { old_size: u64, new_size: u64 },
    #[error("the log already holds 2^64 - 1 leaves and cannot grow")]
    LogFull,
}

/// Why a presented proof was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is out of range for a log of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("a log cannot shrink: old size {old_size} is larger than new size {new_size}")]
    OldSizeExceedsNew { old_size: u64, new_size: u64 },
    #[error("the proof has {actual} hashes, but these sizes need exactly {expected}")]
    WrongLength { expected: usize, actual: usize },
    #[error("the inclusion proof does not lead to the given root")]
    RootMismatch,
    #[error("the consistency proof does not reproduce the old root")]
    OldRootMismatch,
    #[error("the consistency proof does not reproduce the new root")]
    NewRootMismatch,
    #[error(
        "two tree heads of the same size {size} have different roots: \
         the input is wrong or the log has forked"
    )]
    SameSizeRootsDiffer { size: u64 },
}

/// Reads one stored node, turning absence into a typed error.
fn stored(
    source: &(impl NodeSource + ?Sized),
    level: u32,
    index: u64,
) -> Result<Hash, MerkleError> {
    source
        .node(level, index)
        .ok_or(MerkleError::MissingNode { level, index })
}

/// The largest power of two strictly smaller than `n` (RFC 6962's split point `k`); `n >= 2`.
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// MTH(D[start:end]) for a range the RFC recursion can produce, from stored perfect nodes.
///
/// Such a range starts at a multiple of the largest power of two not above its length, so
/// the set bits of `end - start` (largest first) are aligned perfect subtrees, and RFC 6962's
/// split of a non-power-of-two length is exactly "largest piece | the rest". The MTH is
/// therefore the right fold `node(P1, node(P2, ... Pk))`, built here from the smallest piece
/// up: one read per set bit, at most 64.
fn range_hash(
    source: &(impl NodeSource + ?Sized),
    start: u64,
    end: u64,
) -> Result<Hash, MerkleError> {
    debug_assert!(start < end);
    debug_assert!(start % (1 << (63 - (end - start).leading_zeros())) == 0);
    let mut remaining = end - start;
    let mut acc: Option<Hash> = None;
    while remaining != 0 {
        let piece = remaining & remaining.wrapping_neg();
        let level = piece.trailing_zeros();
        let piece_start = start + remaining - piece;
        let hash = stored(source, level, piece_start >> level)?;
        acc = Some(match acc {
            None => hash,
            Some(right) => node_hash(&hash, &right),
        });
        remaining -= piece;
    }
    Ok(acc.unwrap_or_else(empty_root))
}

/// Walks RFC 6962's PATH(index, D[0:size]) from the root down. For each level it calls
/// `step(sibling_start, sibling_end, sibling_is_left)`; the audit path lists those siblings
/// deepest first, i.e. in the reverse of the calls.
fn walk_inclusion<E>(
    index: u64,
    size: u64,
    mut step: impl FnMut(u64, u64, bool) -> Result<(), E>,
) -> Result<(), E> {
    let (mut lo, mut hi) = (0u64, size);
    while hi - lo > 1 {
        let k = split(hi - lo);
        if index < lo + k {
            step(lo + k, hi, false)?;
            hi = lo + k;
        } else {
            step(lo, lo + k, true)?;
            lo += k;
        }
    }
    Ok(())
}

/// Walks RFC 6962's SUBPROOF(old_size, D[0:new_size], true) from the root down, for
/// `0 < old_size < new_size`. Calls `step` like [`walk_inclusion`] for each sibling and
/// returns the range whose MTH must head the proof, or `None` when that range is the whole
/// old tree (the `b = true` case, where the verifier already has its hash: the old root).
fn walk_consistency<E>(
    old_size: u64,
    new_size: u64,
    mut step: impl FnMut(u64, u64, bool) -> Result<(), E>,
) -> Result<Option<(u64, u64)>, E> {
    debug_assert!(0 < old_size && old_size < new_size);
    let (mut lo, mut hi) = (0u64, new_size);
    let mut whole_old_tree = true;
    loop {
        if old_size == hi {
            return Ok(if whole_old_tree { None } else { Some((lo, hi)) });
        }
        let k = split(hi - lo);
        if old_size - lo <= k {
            step(lo + k, hi, false)?;
            hi = lo + k;
        } else {
            step(lo, lo + k, true)?;
            lo += k;
            whole_old_tree = false;
        }
    }
}

/// Appends the leaf hash `leaf` at index `size` and returns every perfect node that becomes
/// complete: `(0, size, leaf)` first, then each newly completed ancestor, bottom up.
///
/// The caller stores the returned nodes; only nodes complete within the old `size` are read
/// (the left siblings along the new leaf's path), so a batch of appends works as long as
/// each call's results are stored before the next call.
pub fn append(
    source: &(impl NodeSource + ?Sized),
    size: u64,
    leaf: Hash,
) -> Result<Vec<(u32, u64, Hash)>, MerkleError> {
    if size == u64::MAX {
        return Err(MerkleError::LogFull);
    }
    let mut out = vec![(0, size, leaf)];
    let (mut level, mut index, mut hash) = (0u32, size, leaf);
    while index & 1 == 1 {
        let left = stored(source, level, index - 1)?;
        hash = node_hash(&left, &hash);
        level += 1;
        index >>= 1;
        out.push((level, index, hash));
    }
    Ok(out)
}

/// The tree head MTH(D[0:size]); [`empty_root`] for size 0. Reads popcount(size) nodes.
pub fn root(source: &(impl NodeSource + ?Sized), size: u64) -> Result<Hash, MerkleError> {
    if size == 0 {
        return Ok(empty_root());
    }
    range_hash(source, 0, size)
}

/// The audit path PATH(index, D[0:size]) of RFC 6962 §2.1.1, deepest sibling first.
///
/// Every sibling is one stored node except the first right-hand sibling met from the top,
/// whose range may be ragged; below it every range is perfect. So at most about
/// 2·⌈log₂ size⌉ nodes are read.
pub fn inclusion_proof(
    source: &(impl NodeSource + ?Sized),
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let mut path = Vec::new();
    walk_inclusion(index, size, |start, end, _| {
        path.push(range_hash(source, start, end)?);
        Ok(())
    })?;
    path.reverse();
    Ok(path)
}

/// The consistency proof PROOF(old_size, D[0:new_size]) of RFC 6962 §2.1.2.
///
/// Empty when `old_size == 0` (everything is consistent with the empty log) or
/// `old_size == new_size` (the roots must simply be equal). Reads O(log new_size) nodes for
/// the same reason as [`inclusion_proof`].
pub fn consistency_proof(
    source: &(impl NodeSource + ?Sized),
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, MerkleError> {
    if old_size > new_size {
        return Err(MerkleError::OldSizeExceedsNew { old_size, new_size });
    }
    if old_size == 0 || old_size == new_size {
        return Ok(Vec::new());
    }
    let mut proof = Vec::new();
    let head = walk_consistency(old_size, new_size, |start, end, _| {
        proof.push(range_hash(source, start, end)?);
        Ok(())
    })?;
    if let Some((start, end)) = head {
        proof.push(range_hash(source, start, end)?);
    }
    proof.reverse();
    Ok(proof)
}

/// Checks that `leaf` is the leaf hash at `index` in the log of `size` whose root is `root`.
///
/// The proof's length and the side of each sibling are fixed by `(index, size)`; anything
/// else is rejected before hashing. Note the size is bound by the root, not by the proof:
/// callers must verify against a signed `(size, root)` pair, never a size taken from the
/// prover alone.
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    // Bit i of `left_siblings` says whether the i-th sibling from the top is on the left.
    let (mut steps, mut left_siblings) = (0usize, 0u64);
    let _ = walk_inclusion(index, size, |_, _, is_left| -> Result<(), Infallible> {
        left_siblings |= u64::from(is_left) << steps;
        steps += 1;
        Ok(())
    });
    if proof.len() != steps {
        return Err(ProofError::WrongLength {
            expected: steps,
            actual: proof.len(),
        });
    }
    let mut hash = *leaf;
    for (depth_from_bottom, sibling) in proof.iter().enumerate() {
        let from_top = steps - 1 - depth_from_bottom;
        hash = if (left_siblings >> from_top) & 1 == 1 {
            node_hash(sibling, &hash)
        } else {
            node_hash(&hash, sibling)
        };
    }
    if hash != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Checks that the log of `new_size` with root `new_root` extends the log of `old_size` with
/// root `old_root`, i.e. that the log only appended.
///
/// Equal sizes need an empty proof and equal roots (different roots at one size is a fork or
/// bad input). Size 0 needs an empty proof and the empty root as `old_root`; it says nothing
/// about `new_root`. Otherwise the proof must have exactly the RFC 6962 length, and
/// rebuilding both roots from it must give `old_root` and `new_root`.
pub fn verify_consistency(
    old_size: u64,
    old_root: &Hash,
    new_size: u64,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::OldSizeExceedsNew { old_size, new_size });
    }
    if old_size == 0 || old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength {
                expected: 0,
                actual: proof.len(),
            });
        }
        if old_size == 0 && *old_root != empty_root() {
            return Err(ProofError::OldRootMismatch);
        }
        if old_size == new_size && old_root != new_root {
            return Err(ProofError::SameSizeRootsDiffer { size: old_size });
        }
        return Ok(());
    }
    let (mut steps, mut left_siblings) = (0usize, 0u64);
    let head = walk_consistency(
        old_size,
        new_size,
        |_, _, is_left| -> Result<(), Infallible> {
            left_siblings |= u64::from(is_left) << steps;
            steps += 1;
            Ok(())
        },
    );
    let has_head = matches!(head, Ok(Some(_)));
    let expected = steps + usize::from(has_head);
    if proof.len() != expected {
        return Err(ProofError::WrongLength {
            expected,
            actual: proof.len(),
        });
    }
    // `old` is the MTH of the part of the current subtree that lies in the old log, `new`
    // the MTH of the whole current subtree; both start at the deepest shared subtree.
    let (start, siblings) = if has_head {
        (proof[0], &proof[1..])
    } else {
        (*old_root, proof)
    };
    let (mut old, mut new) = (start, start);
    for (depth_from_bottom, sibling) in siblings.iter().enumerate() {
        let from_top = steps - 1 - depth_from_bottom;
        if (left_siblings >> from_top) & 1 == 1 {
            // The old log covers the left sibling entirely and continues into this subtree.
            old = node_hash(sibling, &old);
            new = node_hash(sibling, &new);
        } else {
            // The old log ends inside this subtree; the right sibling is new entries only.
            new = node_hash(&new, sibling);
        }
    }
    if old != *old_root {
        return Err(ProofError::OldRootMismatch);
    }
    if new != *new_root {
        return Err(ProofError::NewRootMismatch);
    }
    Ok(())
}

/// An in-memory log, for tests and tools: it stores every perfect node that [`append`]
/// returns, so it can answer [`root`] and both proofs for every size up to its own.
#[derive(Debug, Clone, Default)]
pub struct MemoryTree {
    /// `levels[l][i]` is node `(l, i)`.
    levels: Vec<Vec<Hash>>,
    size: u64,
}

impl MemoryTree {
    pub fn new() -> MemoryTree {
        MemoryTree::default()
    }

    /// Number of leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends an entry (hashed with [`leaf_hash`]) and returns its index.
    pub fn push(&mut self, data: &[u8]) -> u64 {
        self.push_leaf_hash(leaf_hash(data))
    }

    /// Appends an already computed leaf hash and returns its index.
    pub fn push_leaf_hash(&mut self, leaf: Hash) -> u64 {
        let index = self.size;
        // Cannot fail: every node `append` reads was stored by an earlier push, and a
        // memory-backed log never reaches 2^64 - 1 leaves.
        let nodes = append(self, index, leaf).expect("a MemoryTree holds every node append reads");
        for (level, node_index, hash) in nodes {
            let level = level as usize;
            if self.levels.len() <= level {
                self.levels.push(Vec::new());
            }
            debug_assert_eq!(self.levels[level].len() as u64, node_index);
            self.levels[level].push(hash);
        }
        self.size += 1;
        index
    }

    /// The current tree head.
    pub fn root(&self) -> Hash {
        root(self, self.size).expect("a MemoryTree holds every node of its own size")
    }
}

impl NodeSource for MemoryTree {
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        let level = usize::try_from(level).ok()?;
        let index = usize::try_from(index).ok()?;
        self.levels.get(level)?.get(index).copied()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    /// Distinct, varied-length entries so that no two leaves share a hash.
    fn entry(i: u64) -> Vec<u8> {
        let mut data = format!("entry {i}").into_bytes();
        data.extend(std::iter::repeat_n(0xa5, (i % 5) as usize));
        data
    }

    fn entries(n: u64) -> Vec<Vec<u8>> {
        (0..n).map(entry).collect()
    }

    fn tree_of(data: &[Vec<u8>]) -> MemoryTree {
        let mut tree = MemoryTree::new();
        for d in data {
            tree.push(d);
        }
        tree
    }

    fn ceil_log2(n: u64) -> usize {
        (64 - (n - 1).leading_zeros()) as usize
    }

    /// RFC 6962 §2.1's split point, found by counting rather than bit tricks.
    fn reference_k(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }

    /// MTH(D[n]) exactly as RFC 6962 §2.1 defines it, hashing prefixes by hand.
    fn reference_mth(data: &[Vec<u8>]) -> Hash {
        match data.len() {
            0 => Hash::digest(b""),
            1 => Hash::digest_parts(&[&[0], &data[0]]),
            n => {
                let k = reference_k(n);
                let (l, r) = (reference_mth(&data[..k]), reference_mth(&data[k..]));
                Hash::digest_parts(&[&[1], &l.0, &r.0])
            }
        }
    }

    /// PATH(m, D[n]) exactly as RFC 6962 §2.1.1 defines it.
    fn reference_path(m: usize, data: &[Vec<u8>]) -> Vec<Hash> {
        let n = data.len();
        if n == 1 {
            return Vec::new();
        }
        let k = reference_k(n);
        if m < k {
            let mut p = reference_path(m, &data[..k]);
            p.push(reference_mth(&data[k..]));
            p
        } else {
            let mut p = reference_path(m - k, &data[k..]);
            p.push(reference_mth(&data[..k]));
            p
        }
    }

    /// SUBPROOF(m, D[n], b) exactly as RFC 6962 §2.1.2 defines it.
    fn reference_subproof(m: usize, data: &[Vec<u8>], b: bool) -> Vec<Hash> {
        let n = data.len();
        if m == n {
            return if b {
                Vec::new()
            } else {
                vec![reference_mth(data)]
            };
        }
        let k = reference_k(n);
        if m <= k {
            let mut p = reference_subproof(m, &data[..k], b);
            p.push(reference_mth(&data[k..]));
            p
        } else {
            let mut p = reference_subproof(m - k, &data[k..], false);
            p.push(reference_mth(&data[..k]));
            p
        }
    }

    /// A store wrapper that counts reads, records any read of a node that is not complete
    /// within `size`, and can pretend one node is missing.
    struct Audited<'a> {
        inner: &'a MemoryTree,
        size: u64,
        hidden: Option<(u32, u64)>,
        reads: RefCell<Vec<(u32, u64)>>,
    }

    impl<'a> Audited<'a> {
        fn new(inner: &'a MemoryTree, size: u64) -> Audited<'a> {
            Audited {
                inner,
                size,
                hidden: None,
                reads: RefCell::new(Vec::new()),
            }
        }

        fn out_of_bounds_reads(&self) -> Vec<(u32, u64)> {
            let reads = self.reads.borrow();
            reads
                .iter()
                .copied()
                .filter(|&(level, index)| {
                    level >= 64
                        || (index + 1)
                            .checked_mul(1 << level)
                            .is_none_or(|end| end > self.size)
                })
                .collect()
        }
    }

    impl NodeSource for Audited<'_> {
        fn node(&self, level: u32, index: u64) -> Option<Hash> {
            self.reads.borrow_mut().push((level, index));
            if self.hidden == Some((level, index)) {
                return None;
            }
            self.inner.node(level, index)
        }
    }

    fn flip(hash: &Hash, bit: usize) -> Hash {
        let mut bytes = hash.0;
        bytes[bit / 8] ^= 1 << (bit % 8);
        Hash(bytes)
    }

    #[test]
    fn stored_node_root_equals_the_rfc6962_reference_mth_for_every_size_up_to_1024() {
        // Proves the O(log n) root from perfect nodes is RFC 6962's MTH, for every shape.
        let data = entries(1024);
        let tree = tree_of(&data);
        assert_eq!(root(&tree, 0), Ok(empty_root()));
        assert_eq!(reference_mth(&[]), empty_root());
        for n in 1..=1024u64 {
            let reference = reference_mth(&data[..n as usize]);
            assert_eq!(root(&tree, n), Ok(reference), "size {n}");
        }
        assert_eq!(tree.root(), reference_mth(&data));
    }

    #[test]
    fn incremental_roots_equal_the_reference_while_the_log_grows() {
        // Proves append's returned nodes are right at every intermediate size, not just at the end.
        let data = entries(300);
        let mut tree = MemoryTree::new();
        for (i, d) in data.iter().enumerate() {
            assert_eq!(tree.push(d), i as u64);
            assert_eq!(tree.size(), i as u64 + 1);
            assert_eq!(tree.root(), reference_mth(&data[..=i]), "size {}", i + 1);
        }
    }

    #[test]
    fn append_returns_the_leaf_then_each_completed_ancestor_and_refuses_to_overflow() {
        // Proves append's contract: bottom-up completed nodes, and a typed error at 2^64 - 1.
        let tree = tree_of(&entries(7));
        let leaf = leaf_hash(b"eighth");
        let nodes = append(&tree, 7, leaf).unwrap();
        let places: Vec<(u32, u64)> = nodes.iter().map(|&(l, i, _)| (l, i)).collect();
        assert_eq!(places, vec![(0, 7), (1, 3), (2, 1), (3, 0)]);
        assert_eq!(nodes[0].2, leaf);
        let mut full = tree_of(&entries(7));
        full.push_leaf_hash(leaf);
        assert_eq!(nodes[3].2, full.root());
        // An even index completes nothing above the leaf.
        assert_eq!(append(&tree, 6, leaf).unwrap(), vec![(0, 6, leaf)]);
        assert_eq!(append(&tree, u64::MAX, leaf), Err(MerkleError::LogFull));
    }

    #[test]
    fn inclusion_proofs_verify_and_are_at_most_ceil_log2_n_hashes() {
        // Proves every generated audit path verifies and is no longer than ⌈log₂ n⌉ hashes,
        // with the deepest leaf reaching that bound. Covered: every index of every size
        // 1..=256; for sizes 257..=1024, every 37th index plus the first, middle and last.
        let data = entries(1024);
        let tree = tree_of(&data);
        for n in 1..=1024u64 {
            let root_n = root(&tree, n).unwrap();
            let indexes: Vec<u64> = if n <= 256 {
                (0..n).collect()
            } else {
                let mut v: Vec<u64> = (0..n).step_by(37).collect();
                v.extend([0, n / 2, n - 1]);
                v
            };
            let bound = if n == 1 { 0 } else { ceil_log2(n) };
            let mut longest = 0;
            for &i in &indexes {
                let proof = inclusion_proof(&tree, i, n).unwrap();
                let leaf = leaf_hash(&data[i as usize]);
                assert_eq!(
                    verify_inclusion(&leaf, i, n, &proof, &root_n),
                    Ok(()),
                    "index {i} size {n}"
                );
                assert!(proof.len() <= bound, "index {i} size {n}");
                assert!(proof.len() * 32 <= 32 * bound);
                longest = longest.max(proof.len());
            }
            assert_eq!(
                longest, bound,
                "size {n}: the deepest leaf has ⌈log₂ n⌉ siblings"
            );
            assert_eq!(longest * 32, 32 * bound);
        }
    }

    #[test]
    fn inclusion_proofs_equal_rfc6962_path_for_every_index_up_to_size_64() {
        // Proves the O(log n) generator returns exactly RFC 6962's PATH, order included.
        let data = entries(64);
        let tree = tree_of(&data);
        for n in 1..=64usize {
            for m in 0..n {
                assert_eq!(
                    inclusion_proof(&tree, m as u64, n as u64).unwrap(),
                    reference_path(m, &data[..n]),
                    "index {m} size {n}"
                );
            }
        }
    }

    #[test]
    fn consistency_proofs_verify_for_all_pairs_to_128_and_sampled_pairs_to_1024() {
        // Proves every generated consistency proof verifies and is at most ⌈log₂ n⌉ + 1
        // hashes. Covered: all 1 <= m <= n <= 128; every m for n in a set of sizes around
        // powers of two up to 1024; and every n from m to 1024 for a set of old sizes m.
        let tree = tree_of(&entries(1024));
        let roots: Vec<Hash> = (0..=1024).map(|n| root(&tree, n).unwrap()).collect();
        let check = |m: u64, n: u64| {
            let proof = consistency_proof(&tree, m, n).unwrap();
            assert_eq!(
                verify_consistency(m, &roots[m as usize], n, &roots[n as usize], &proof),
                Ok(()),
                "{m} -> {n}"
            );
            let bound = if n == 1 { 1 } else { ceil_log2(n) + 1 };
            assert!(proof.len() <= bound, "{m} -> {n}: {} hashes", proof.len());
            if m == n {
                assert!(proof.is_empty());
            }
        };
        for n in 1..=128 {
            for m in 1..=n {
                check(m, n);
            }
        }
        for n in [
            129, 255, 256, 257, 500, 511, 512, 513, 777, 1000, 1023, 1024,
        ] {
            for m in 1..=n {
                check(m, n);
            }
        }
        for m in [1, 2, 3, 63, 64, 65, 127, 200, 256, 333, 512, 700, 1023] {
            for n in m..=1024 {
                check(m, n);
            }
        }
    }

    #[test]
    fn consistency_proofs_equal_rfc6962_proof_for_every_pair_up_to_size_64() {
        // Proves the O(log n) generator returns exactly RFC 6962's PROOF, order included.
        let data = entries(64);
        let tree = tree_of(&data);
        for n in 1..=64usize {
            for m in 1..=n {
                assert_eq!(
                    consistency_proof(&tree, m as u64, n as u64).unwrap(),
                    reference_subproof(m, &data[..n], true),
                    "{m} -> {n}"
                );
            }
        }
    }

    #[test]
    fn tampered_inclusion_proofs_are_rejected() {
        // Proves any single-bit change to a proof hash, the root or the leaf, a wrong index,
        // a wrong size against that size's root, or a truncated/extended proof is rejected.
        // Covered: sizes 1, 2, 3, 7, 8, 9 with every index; 100 and 1024 with first, second,
        // middle, second-to-last and last indexes.
        let tree = tree_of(&entries(1024));
        for n in [1u64, 2, 3, 7, 8, 9, 100, 1024] {
            let root_n = root(&tree, n).unwrap();
            let indexes: Vec<u64> = if n <= 9 {
                (0..n).collect()
            } else {
                vec![0, 1, n / 2, n - 2, n - 1]
            };
            for i in indexes {
                let leaf = tree.node(0, i).unwrap();
                let proof = inclusion_proof(&tree, i, n).unwrap();
                assert_eq!(verify_inclusion(&leaf, i, n, &proof, &root_n), Ok(()));
                for e in 0..proof.len() {
                    for bit in 0..256 {
                        let mut bad = proof.clone();
                        bad[e] = flip(&bad[e], bit);
                        assert_eq!(
                            verify_inclusion(&leaf, i, n, &bad, &root_n),
                            Err(ProofError::RootMismatch)
                        );
                    }
                }
                for bit in 0..256 {
                    assert!(verify_inclusion(&leaf, i, n, &proof, &flip(&root_n, bit)).is_err());
                    assert!(verify_inclusion(&flip(&leaf, bit), i, n, &proof, &root_n).is_err());
                }
                for wrong in [i.wrapping_sub(1), i + 1, i ^ 1, i ^ 2, n, u64::MAX] {
                    if wrong != i {
                        assert!(verify_inclusion(&leaf, wrong, n, &proof, &root_n).is_err());
                    }
                }
                for wrong_n in [i + 1, n - 1, n + 1, n + 2, 2 * n, n / 2] {
                    if wrong_n != n && wrong_n > i && wrong_n <= 1024 {
                        let wrong_root = root(&tree, wrong_n).unwrap();
                        assert!(verify_inclusion(&leaf, i, wrong_n, &proof, &wrong_root).is_err());
                    }
                }
                assert_eq!(
                    verify_inclusion(&leaf, i, 0, &proof, &root_n),
                    Err(ProofError::IndexOutOfRange { index: i, size: 0 })
                );
                let mut longer = proof.clone();
                longer.push(leaf);
                assert!(matches!(
                    verify_inclusion(&leaf, i, n, &longer, &root_n),
                    Err(ProofError::WrongLength { .. })
                ));
                if !proof.is_empty() {
                    assert!(matches!(
                        verify_inclusion(&leaf, i, n, &proof[1..], &root_n),
                        Err(ProofError::WrongLength { .. })
                    ));
                    // Swapping siblings of different levels must not pass either.
                    let mut swapped = proof.clone();
                    swapped.rotate_left(1);
                    if swapped != proof {
                        assert!(verify_inclusion(&leaf, i, n, &swapped, &root_n).is_err());
                    }
                }
            }
        }
    }

    #[test]
    fn inclusion_proof_alone_does_not_bind_the_size_the_signed_root_does() {
        // Proves the limit callers must respect: leaf 0's path has the same shape in sizes 7
        // and 8, so a size taken from the prover is unchecked unless it comes with its root.
        let tree = tree_of(&entries(8));
        let leaf = tree.node(0, 0).unwrap();
        let proof = inclusion_proof(&tree, 0, 8).unwrap();
        let root8 = root(&tree, 8).unwrap();
        let root7 = root(&tree, 7).unwrap();
        assert_eq!(verify_inclusion(&leaf, 0, 7, &proof, &root8), Ok(()));
        assert_eq!(
            verify_inclusion(&leaf, 0, 7, &proof, &root7),
            Err(ProofError::RootMismatch)
        );
    }

    #[test]
    fn tampered_consistency_proofs_are_rejected() {
        // Proves any single-bit change to a proof hash, the old root or the new root, wrong
        // sizes against those sizes' roots, or a truncated/extended proof is rejected.
        // Covered: every 1 <= m < n for n in 2, 3, 7, 8, 9; and several m for n = 100, 1024.
        let tree = tree_of(&entries(1024));
        let roots: Vec<Hash> = (0..=1024).map(|n| root(&tree, n).unwrap()).collect();
        let mut pairs = Vec::new();
        for n in [2u64, 3, 7, 8, 9] {
            pairs.extend((1..n).map(|m| (m, n)));
        }
        for n in [100u64, 1024] {
            pairs.extend([1, 2, 3, 7, 8, 64, n / 2 + 1, n - 1].map(|m| (m, n)));
        }
        for (m, n) in pairs {
            let (old, new) = (roots[m as usize], roots[n as usize]);
            let proof = consistency_proof(&tree, m, n).unwrap();
            assert_eq!(verify_consistency(m, &old, n, &new, &proof), Ok(()));
            for e in 0..proof.len() {
                for bit in 0..256 {
                    let mut bad = proof.clone();
                    bad[e] = flip(&bad[e], bit);
                    assert!(
                        verify_consistency(m, &old, n, &new, &bad).is_err(),
                        "{m} -> {n}: element {e} bit {bit}"
                    );
                }
            }
            for bit in 0..256 {
                assert!(verify_consistency(m, &flip(&old, bit), n, &new, &proof).is_err());
                assert!(verify_consistency(m, &old, n, &flip(&new, bit), &proof).is_err());
            }
            for (wm, wn) in [(m - 1, n), (m + 1, n), (m, n - 1), (m, n + 1), (m, 2 * n)] {
                if (wm, wn) != (m, n) && wm <= wn && wn <= 1024 && wm > 0 && wm != wn {
                    let (wo, wnr) = (&roots[wm as usize], &roots[wn as usize]);
                    assert!(
                        verify_consistency(wm, wo, wn, wnr, &proof).is_err(),
                        "{m} -> {n} presented as {wm} -> {wn}"
                    );
                }
            }
            // Swapping the roots claims the log shrank or forked.
            assert!(verify_consistency(n, &new, m, &old, &proof).is_err());
            let mut longer = proof.clone();
            longer.push(new);
            assert!(matches!(
                verify_consistency(m, &old, n, &new, &longer),
                Err(ProofError::WrongLength { .. })
            ));
            assert!(matches!(
                verify_consistency(m, &old, n, &new, &proof[1..]),
                Err(ProofError::WrongLength { .. })
            ));
        }
    }

    #[test]
    fn degenerate_and_out_of_range_arguments_give_typed_errors() {
        // Proves the edge cases of both APIs: empty and equal-size consistency, size 0,
        // index >= size and shrinking logs are typed errors or exact answers, never panics.
        let tree = tree_of(&entries(10));
        let r = |n| root(&tree, n).unwrap();
        assert_eq!(
            inclusion_proof(&tree, 10, 10),
            Err(MerkleError::IndexOutOfRange {
                index: 10,
                size: 10
            })
        );
        assert_eq!(
            inclusion_proof(&tree, 0, 0),
            Err(MerkleError::IndexOutOfRange { index: 0, size: 0 })
        );
        assert_eq!(
            consistency_proof(&tree, 5, 4),
            Err(MerkleError::OldSizeExceedsNew {
                old_size: 5,
                new_size: 4
            })
        );
        assert_eq!(consistency_proof(&tree, 0, 10), Ok(vec![]));
        assert_eq!(consistency_proof(&tree, 0, 0), Ok(vec![]));
        assert_eq!(consistency_proof(&tree, 7, 7), Ok(vec![]));
        assert_eq!(inclusion_proof(&tree, 0, 1), Ok(vec![]));

        let empty = empty_root();
        assert_eq!(verify_consistency(0, &empty, 10, &r(10), &[]), Ok(()));
        assert_eq!(verify_consistency(0, &empty, 0, &empty, &[]), Ok(()));
        assert_eq!(
            verify_consistency(0, &r(1), 10, &r(10), &[]),
            Err(ProofError::OldRootMismatch)
        );
        assert_eq!(
            verify_consistency(0, &empty, 10, &r(10), &[r(3)]),
            Err(ProofError::WrongLength {
                expected: 0,
                actual: 1
            })
        );
        assert_eq!(verify_consistency(7, &r(7), 7, &r(7), &[]), Ok(()));
        assert_eq!(
            verify_consistency(7, &r(7), 7, &r(8), &[]),
            Err(ProofError::SameSizeRootsDiffer { size: 7 })
        );
        assert_eq!(
            verify_consistency(7, &r(7), 7, &r(7), &[r(7)]),
            Err(ProofError::WrongLength {
                expected: 0,
                actual: 1
            })
        );
        assert_eq!(
            verify_consistency(8, &r(8), 7, &r(7), &[]),
            Err(ProofError::OldSizeExceedsNew {
                old_size: 8,
                new_size: 7
            })
        );
        assert_eq!(
            verify_consistency(3, &r(3), 7, &r(7), &[]),
            Err(ProofError::WrongLength {
                expected: 4,
                actual: 0
            })
        );
        assert_eq!(
            verify_inclusion(&r(1), 0, 1, &[], &r(1)),
            Ok(()),
            "a one-leaf log's root is its leaf"
        );
        assert_eq!(
            verify_inclusion(&r(1), 1, 1, &[], &r(1)),
            Err(ProofError::IndexOutOfRange { index: 1, size: 1 })
        );
        // Verifiers handle the largest sizes without overflow.
        let max = u64::MAX;
        assert_eq!(
            verify_inclusion(&r(1), 0, max, &[], &r(1)),
            Err(ProofError::WrongLength {
                expected: 64,
                actual: 0
            })
        );
        assert_eq!(
            verify_inclusion(&r(1), max - 1, max, &[], &r(1)),
            Err(ProofError::WrongLength {
                expected: 63,
                actual: 0
            })
        );
        assert!(matches!(
            verify_consistency(max - 1, &r(1), max, &r(2), &[]),
            Err(ProofError::WrongLength { .. })
        ));
        assert!(matches!(
            verify_consistency(1, &r(1), max, &r(2), &[r(3); 64]),
            Err(ProofError::NewRootMismatch)
        ));
    }

    #[test]
    fn matches_the_certificate_transparency_reference_test_vectors() {
        // Proves interoperability: roots, audit paths and consistency proofs for the
        // 8-leaf data of the CT reference tests equal the published values.
        let data: Vec<Vec<u8>> = [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
        .iter()
        .map(|h| hex::decode(h).unwrap())
        .collect();
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let h = |s: &str| Hash::from_hex(s).unwrap();
        let tree = tree_of(&data);
        assert_eq!(
            empty_root(),
            h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
        assert_eq!(leaf_hash(b""), h(roots[0]));
        for (n, expected) in (1u64..).zip(roots) {
            assert_eq!(root(&tree, n).unwrap().to_hex(), expected, "size {n}");
        }

        let inclusion = [
            (
                0,
                vec![
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                vec![
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        let root8 = h(roots[7]);
        for (index, expected) in inclusion {
            let expected: Vec<Hash> = expected.into_iter().map(h).collect();
            assert_eq!(inclusion_proof(&tree, index, 8).unwrap(), expected);
            let leaf = leaf_hash(&data[index as usize]);
            assert_eq!(verify_inclusion(&leaf, index, 8, &expected, &root8), Ok(()));
        }

        let consistency = [
            (
                2,
                vec![
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                vec![
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        for (old, expected) in consistency {
            let expected: Vec<Hash> = expected.into_iter().map(h).collect();
            assert_eq!(consistency_proof(&tree, old, 8).unwrap(), expected);
            let old_root = h(roots[old as usize - 1]);
            assert_eq!(
                verify_consistency(old, &old_root, 8, &root8, &expected),
                Ok(())
            );
        }
    }

    #[test]
    fn rfc6962_section_2_1_3_worked_examples_come_out_as_printed() {
        // Proves element order against the RFC's own 7-leaf example tree (a..l as in the RFC).
        let data = entries(7);
        let tree = tree_of(&data);
        let leaf = |i: usize| leaf_hash(&data[i]);
        let (a, b, c, d, e, f, j) = (
            leaf(0),
            leaf(1),
            leaf(2),
            leaf(3),
            leaf(4),
            leaf(5),
            leaf(6),
        );
        let (g, h, i) = (node_hash(&a, &b), node_hash(&c, &d), node_hash(&e, &f));
        let (k, l) = (node_hash(&g, &h), node_hash(&i, &j));
        assert_eq!(tree.root(), node_hash(&k, &l));
        assert_eq!(inclusion_proof(&tree, 0, 7).unwrap(), vec![b, h, l]);
        assert_eq!(inclusion_proof(&tree, 3, 7).unwrap(), vec![c, g, l]);
        assert_eq!(inclusion_proof(&tree, 4, 7).unwrap(), vec![f, j, k]);
        assert_eq!(inclusion_proof(&tree, 6, 7).unwrap(), vec![i, k]);
        assert_eq!(consistency_proof(&tree, 3, 7).unwrap(), vec![c, d, g, l]);
        assert_eq!(consistency_proof(&tree, 4, 7).unwrap(), vec![l]);
        assert_eq!(consistency_proof(&tree, 6, 7).unwrap(), vec![i, j, k]);
    }

    #[test]
    fn operations_read_only_complete_nodes_within_size_and_only_o_log_n_of_them() {
        // Proves the storage contract: no read of an incomplete or out-of-size node (so
        // batched appends work), and at most 2·⌈log₂ n⌉ + 2 reads per root or proof.
        let tree = tree_of(&entries(1024));
        let bound = |n: u64| 2 * ceil_log2(n.max(2)) + 2;
        for n in (1..=1024u64).step_by(7).chain([255, 256, 257, 1023, 1024]) {
            let audit = |run: &dyn Fn(&Audited)| {
                let source = Audited::new(&tree, n);
                run(&source);
                assert_eq!(source.out_of_bounds_reads(), vec![], "size {n}");
                let reads = source.reads.borrow().len();
                assert!(reads <= bound(n), "size {n}: {reads} reads");
            };
            audit(&|s: &Audited| {
                root(s, n).unwrap();
            });
            for i in [0, n / 3, n / 2, n - 1] {
                audit(&|s: &Audited| {
                    inclusion_proof(s, i, n).unwrap();
                });
            }
            for m in [1, n / 3, n / 2, n - 1, n].into_iter().filter(|&m| m >= 1) {
                audit(&|s: &Audited| {
                    consistency_proof(s, m, n).unwrap();
                });
            }
            if n < 1024 {
                audit(&|s: &Audited| {
                    append(s, n, leaf_hash(b"next")).unwrap();
                });
            }
        }
    }

    #[test]
    fn a_missing_node_is_a_missing_node_error_never_a_panic() {
        // Proves every operation reports each node it needs but cannot read as
        // MissingNode naming that node, and that an empty store errors cleanly.
        let tree = tree_of(&entries(100));
        type Op = Box<dyn Fn(&Audited) -> Result<(), MerkleError>>;
        let ops: Vec<(&str, Op)> = vec![
            ("root", Box::new(|s: &Audited| root(s, 100).map(drop))),
            ("root 77", Box::new(|s: &Audited| root(s, 77).map(drop))),
            (
                "inclusion 0",
                Box::new(|s: &Audited| inclusion_proof(s, 0, 100).map(drop)),
            ),
            (
                "inclusion 99",
                Box::new(|s: &Audited| inclusion_proof(s, 99, 100).map(drop)),
            ),
            (
                "inclusion 50/77",
                Box::new(|s: &Audited| inclusion_proof(s, 50, 77).map(drop)),
            ),
            (
                "consistency 3",
                Box::new(|s: &Audited| consistency_proof(s, 3, 100).map(drop)),
            ),
            (
                "consistency 64",
                Box::new(|s: &Audited| consistency_proof(s, 64, 100).map(drop)),
            ),
            (
                "consistency 77",
                Box::new(|s: &Audited| consistency_proof(s, 77, 99).map(drop)),
            ),
            (
                "append 95",
                Box::new(|s: &Audited| append(s, 95, Hash::ZERO).map(drop)),
            ),
        ];
        for (name, op) in &ops {
            let source = Audited::new(&tree, 100);
            op(&source).unwrap();
            let needed: HashSet<(u32, u64)> = source.reads.borrow().iter().copied().collect();
            assert!(!needed.is_empty(), "{name}");
            for &(level, index) in &needed {
                let mut source = Audited::new(&tree, 100);
                source.hidden = Some((level, index));
                assert_eq!(
                    op(&source),
                    Err(MerkleError::MissingNode { level, index }),
                    "{name}"
                );
            }
        }
        let empty = MemoryTree::new();
        assert!(matches!(
            root(&empty, 5),
            Err(MerkleError::MissingNode { .. })
        ));
        assert!(matches!(
            inclusion_proof(&empty, 2, 5),
            Err(MerkleError::MissingNode { .. })
        ));
        assert!(matches!(
            consistency_proof(&empty, 2, 5),
            Err(MerkleError::MissingNode { .. })
        ));
        assert!(matches!(
            append(&empty, 5, Hash::ZERO),
            Err(MerkleError::MissingNode { level: 0, index: 4 })
        ));
        // Asking beyond what the store holds is an error too, not a panic or a wrong root.
        assert!(matches!(
            root(&tree, 101),
            Err(MerkleError::MissingNode { .. })
        ));
        assert!(matches!(
            root(&tree, u64::MAX),
            Err(MerkleError::MissingNode { .. })
        ));
        assert!(matches!(
            inclusion_proof(&tree, u64::MAX - 1, u64::MAX),
            Err(MerkleError::MissingNode { .. })
        ));
        assert!(matches!(
            consistency_proof(&tree, 1, u64::MAX),
            Err(MerkleError::MissingNode { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn verifiers_never_panic_and_never_accept_junk(
            a in any::<u64>(),
            b in any::<u64>(),
            len in 0usize..70,
            seed in any::<u8>(),
        ) {
            // Proves arbitrary sizes (up to 2^64 - 1) and junk proofs only ever produce errors.
            let proof: Vec<Hash> = (0..len).map(|i| Hash([seed ^ i as u8; 32])).collect();
            let leaf = Hash([seed; 32]);
            let root_hash = Hash([seed.wrapping_add(1); 32]);
            prop_assert!(verify_inclusion(&leaf, a, b, &proof, &root_hash).is_err());
            let result = verify_consistency(a.min(b), &leaf, a.max(b), &root_hash, &proof);
            prop_assert!(result.is_err());
        }
    }
}
