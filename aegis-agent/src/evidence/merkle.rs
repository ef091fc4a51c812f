//! The Merkle tree of Certificate Transparency (RFC 6962 §2.1, RFC 9162 §2.1) over the
//! decision log's entries: leaf hash `SHA-256(0x00 || entry)`, node hash
//! `SHA-256(0x01 || left || right)`, a tree of n leaves split at the largest power of two
//! below n. Any tlog tool (Go's `golang.org/x/mod/sumdb/tlog`, transparency-dev/merkle)
//! computes the same roots and checks the same inclusion proofs.
//!
//! Written here rather than taken from `ct-merkle`: that crate keeps every leaf and node in
//! memory, and the log can hold millions of entries. What the log needs is small:
//! - [`Frontier`], the right edge of the tree (one subtree root per set bit of the size):
//!   an append costs O(log n) hashes and the root is one fold of at most 64 hashes;
//! - [`inclusion_path`] over a [`LeafSource`] (the leaf side file), computing each sibling
//!   subtree by streaming its leaves through a [`Frontier`]: O(n) hashes, O(log n) memory;
//! - [`root_from_inclusion`], the verifier of RFC 9162 §2.1.3.2, which a third party
//!   reimplements from the RFC alone.

use std::io;

use sha2::{Digest as _, Sha256};

/// A SHA-256 hash: leaf, node or root.
pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The hash of a leaf whose data is `entry`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

/// The hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The right edge of a tree: for each set bit of `size`, from the highest, the root of the
/// perfect subtree of that many leaves. All that is needed to append and to compute the
/// root, and all that is kept of the tree in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    nodes: Vec<Hash>,
}

impl Frontier {
    pub fn new() -> Self {
        Self::default()
    }

    /// A frontier as [`Self::nodes`] gave it; None when the node count does not fit the size.
    pub fn from_parts(size: u64, nodes: Vec<Hash>) -> Option<Self> {
        (nodes.len() == size.count_ones() as usize).then_some(Self { size, nodes })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The subtree roots, largest (leftmost) first.
    pub fn nodes(&self) -> &[Hash] {
        &self.nodes
    }

    /// Append a leaf: merges as many subtrees as the size has trailing one bits.
    pub fn push(&mut self, leaf: Hash) {
        let mut hash = leaf;
        let mut size = self.size;
        while size & 1 == 1 {
            let left = self.nodes.pop().expect("one node per set bit");
            hash = node_hash(&left, &hash);
            size >>= 1;
        }
        self.nodes.push(hash);
        self.size += 1;
    }

    /// The tree's root (RFC 6962 MTH of the leaves pushed so far).
    pub fn root(&self) -> Hash {
        let mut nodes = self.nodes.iter().rev();
        let Some(&last) = nodes.next() else { return empty_root() };
        nodes.fold(last, |right, left| node_hash(left, &right))
    }
}

/// Leaf hashes by index: the leaf side file, or a slice in tests.
pub trait LeafSource {
    /// Fill `out` with the leaf hashes from index `start` on.
    fn read_leaves(&mut self, start: u64, out: &mut [Hash]) -> io::Result<()>;
}

impl LeafSource for &[Hash] {
    fn read_leaves(&mut self, start: u64, out: &mut [Hash]) -> io::Result<()> {
        let start = usize::try_from(start).map_err(io::Error::other)?;
        let src = self.get(start..start + out.len()).ok_or_else(|| io::Error::other("leaf index out of range"))?;
        out.copy_from_slice(src);
        Ok(())
    }
}

/// Leaves read at once while streaming a subtree.
const CHUNK: usize = 4096;

/// The root of the subtree over leaves `start..end`, streamed from `source`.
pub fn subtree_root(source: &mut impl LeafSource, start: u64, end: u64) -> io::Result<Hash> {
    let mut frontier = Frontier::new();
    let mut buf = vec![[0u8; 32]; CHUNK.min((end - start) as usize)];
    let mut at = start;
    while at < end {
        let n = CHUNK.min((end - at) as usize);
        source.read_leaves(at, &mut buf[..n])?;
        for leaf in &buf[..n] {
            frontier.push(*leaf);
        }
        at += n as u64;
    }
    Ok(frontier.root())
}

/// The audit path of leaf `index` in the tree of the first `size` leaves (RFC 9162
/// §2.1.3.1), from the leaf's sibling up to the root's child.
pub fn inclusion_path(source: &mut impl LeafSource, index: u64, size: u64) -> io::Result<Vec<Hash>> {
    assert!(index < size, "the leaf is in the tree");
    let mut path = Vec::new();
    let (mut lo, mut hi) = (0u64, size);
    // Top-down: at each level, the subtree that does not hold the leaf is a sibling.
    while hi - lo > 1 {
        let split = lo + largest_power_of_two_below(hi - lo);
        if index < split {
            path.push(subtree_root(source, split, hi)?);
            hi = split;
        } else {
            path.push(subtree_root(source, lo, split)?);
            lo = split;
        }
    }
    path.reverse();
    Ok(path)
}

/// The largest power of two smaller than `n` (n >= 2).
fn largest_power_of_two_below(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// Why an inclusion proof does not fit its tree.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("the leaf index {index} is not below the tree size {size}")]
    IndexBeyondSize { index: u64, size: u64 },
    #[error("the path has {got} hashes, a leaf at {index} of a tree of {size} needs {want}")]
    PathLength { index: u64, size: u64, got: usize, want: usize },
}

/// The root that leaf `leaf` at `index` and its audit `path` give for a tree of `size`
/// leaves (RFC 9162 §2.1.3.2). The proof holds when it equals the signed root.
pub fn root_from_inclusion(index: u64, size: u64, leaf: &Hash, path: &[Hash]) -> Result<Hash, ProofError> {
    if index >= size {
        return Err(ProofError::IndexBeyondSize { index, size });
    }
    let want = path_length(index, size);
    if path.len() != want {
        return Err(ProofError::PathLength { index, size, got: path.len(), want });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut root = *leaf;
    for p in path {
        if fn_ & 1 == 1 || fn_ == sn {
            root = node_hash(p, &root);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            root = node_hash(&root, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    debug_assert_eq!(sn, 0, "the length was checked");
    Ok(root)
}

/// Hashes in the audit path of leaf `index` in a tree of `size` leaves.
fn path_length(index: u64, size: u64) -> usize {
    let (mut lo, mut hi, mut n) = (0u64, size, 0);
    while hi - lo > 1 {
        let split = lo + largest_power_of_two_below(hi - lo);
        if index < split {
            hi = split
        } else {
            lo = split
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::hex;

    fn h(s: &str) -> Hash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    /// The leaves of transparency-dev/merkle's and RFC 6962's reference tests.
    fn reference_leaves() -> Vec<Hash> {
        ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
            .iter()
            .map(|d| leaf_hash(&hex::decode(d).unwrap()))
            .collect()
    }

    /// Roots of the first 1..=8 reference leaves (transparency-dev/merkle proof/verify_test.go).
    const ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    /// The recursive definition of RFC 6962 §2.1, as a reference for everything else.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = largest_power_of_two_below(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    #[test]
    fn hashes_match_the_rfc6962_reference() {
        // transparency-dev/merkle rfc6962/rfc6962_test.go.
        assert_eq!(empty_root(), h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
        assert_eq!(leaf_hash(b""), h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"));
        assert_eq!(leaf_hash(b"L123456"), h("395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"));
        let (l, r): (Vec<u8>, Vec<u8>) = (b"N123".to_vec(), b"N456".to_vec());
        let mut node = vec![1u8];
        node.extend(&l);
        node.extend(&r);
        assert_eq!(
            <Hash>::from(Sha256::digest(&node)),
            h("aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb")
        );
    }

    #[test]
    fn frontier_roots_match_the_reference_roots() {
        let leaves = reference_leaves();
        let mut frontier = Frontier::new();
        assert_eq!(frontier.root(), empty_root());
        for (i, leaf) in leaves.iter().enumerate() {
            frontier.push(*leaf);
            assert_eq!(frontier.root(), h(ROOTS[i]), "root of {} leaves", i + 1);
            assert_eq!(frontier.nodes().len(), (i + 1).count_ones() as usize);
        }
        let again = Frontier::from_parts(frontier.size(), frontier.nodes().to_vec()).unwrap();
        assert_eq!(again, frontier);
        assert_eq!(Frontier::from_parts(7, vec![[0; 32]; 2]), None);
    }

    #[test]
    fn inclusion_proofs_match_the_reference_vectors() {
        let leaves = reference_leaves();
        // (1-based leaf, tree size, path) from transparency-dev/merkle proof/verify_test.go.
        let vectors: [(u64, u64, &[&str]); 5] = [
            (1, 1, &[]),
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (3, 3, &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
            (
                2,
                5,
                &[
                    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (leaf, size, want) in vectors {
            let (index, want): (u64, Vec<Hash>) = (leaf - 1, want.iter().map(|s| h(s)).collect());
            let path = inclusion_path(&mut &leaves[..], index, size).unwrap();
            assert_eq!(path, want, "path of leaf {index} in {size}");
            let root = root_from_inclusion(index, size, &leaves[index as usize], &path).unwrap();
            assert_eq!(root, h(ROOTS[size as usize - 1]), "root from the path of leaf {index} in {size}");
        }
    }

    #[test]
    fn every_proof_of_every_small_tree_verifies_and_corrupted_ones_do_not() {
        let leaves: Vec<Hash> = (0..70u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        for size in 1..=leaves.len() as u64 {
            let root = mth(&leaves[..size as usize]);
            assert_eq!(subtree_root(&mut &leaves[..], 0, size).unwrap(), root);
            for index in 0..size {
                let leaf = leaves[index as usize];
                let path = inclusion_path(&mut &leaves[..], index, size).unwrap();
                assert_eq!(root_from_inclusion(index, size, &leaf, &path), Ok(root), "{index} in {size}");
                // The probes of transparency-dev's corruptInclusionProof.
                let wrong = |i: u64, s: u64, l: &Hash, p: &[Hash]| root_from_inclusion(i, s, l, p) != Ok(root);
                if index > 0 {
                    assert!(wrong(index - 1, size, &leaf, &path));
                }
                assert!(wrong(index + 1, size, &leaf, &path));
                assert!(wrong(index ^ 2, size, &leaf, &path) || index ^ 2 == index);
                assert!(wrong(index, size * 2, &leaf, &path));
                assert!(wrong(index, size / 2, &leaf, &path));
                assert!(wrong(index, size, &leaf_hash(b"WrongLeaf"), &path));
                let mut longer = path.clone();
                longer.push(root);
                assert!(wrong(index, size, &leaf, &longer));
                longer.rotate_right(1);
                assert!(wrong(index, size, &leaf, &longer));
                for i in 0..path.len() {
                    let mut flipped = path.clone();
                    flipped[i][0] ^= 8;
                    assert!(wrong(index, size, &leaf, &flipped));
                }
                if !path.is_empty() {
                    assert!(wrong(index, size, &leaf, &path[..path.len() - 1]));
                }
            }
        }
    }

    #[test]
    fn proofs_beyond_the_tree_are_errors() {
        assert_eq!(root_from_inclusion(0, 0, &[0; 32], &[]), Err(ProofError::IndexBeyondSize { index: 0, size: 0 }));
        assert_eq!(root_from_inclusion(5, 3, &[0; 32], &[]), Err(ProofError::IndexBeyondSize { index: 5, size: 3 }));
        let err = root_from_inclusion(0, 4, &[0; 32], &[[1; 32]]).unwrap_err();
        assert_eq!(err.to_string(), "the path has 1 hashes, a leaf at 0 of a tree of 4 needs 2");
        assert_eq!(root_from_inclusion(0, u64::MAX, &[0; 32], &[[0; 32]; 64]).map(|_| ()), Ok(()));
    }
}
