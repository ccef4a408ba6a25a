//! Blocks: batches of transactions, their outcomes, and the hash chain that binds them.
//!
//! Every transaction (and the genesis configuration, as leaf 0) is a leaf of one RFC 6962
//! Merkle log across all blocks; each header commits to the block's own leaves (`tx_root`),
//! to the whole log so far (`log_size`, `log_root`), to the previous header and to the state
//! after the block. Executing is a pure function of (state, head, inputs): every node, and
//! `replay` from genesis, reaches the same header.

use serde::{Deserialize, Serialize};

use crate::canonical::to_canonical_bytes;
use crate::contracts::{self, Candidate, ChainConfig, Rejection, TxOutcome};
use crate::hash::Hash;
use crate::identity::split_user_id;
use crate::identity::OrgKind;
use crate::merkle::{self, NodeSource};
use crate::model::Contribution;
use crate::state::{keys, next_state_hash, Overlay, StateRead, WriteSet};
use crate::tx::{SignedTx, TxBody};
use std::collections::BTreeMap;

/// Most transactions in one block.
pub const BLOCK_TXS_MAX: usize = 8192;

/// Domain separation for block header hashes.
pub const BLOCK_PREFIX: &[u8] = b"medledger/block/v1\n";

/// How the consortium starts: its root, its founding members and their first users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenesisConfig {
    pub chain_id: String,
    pub time_ms: u64,
    /// DER, base64url: the self-signed consortium root.
    pub root_certificate: String,
    pub organisations: Vec<GenesisOrg>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenesisOrg {
    pub id: String,
    pub kind: OrgKind,
    /// DER, base64url, issued by the root.
    pub ca_certificate: String,
    /// DER, base64url, issued by the organisation's CA: at least one org_admin, plus any
    /// nodes or staff enrolled from the start.
    pub members: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockHeader {
    pub chain_id: String,
    pub height: u64,
    pub prev_hash: Hash,
    pub time_ms: u64,
    /// The member node that ordered the block.
    pub proposer: String,
    pub tx_count: u64,
    /// RFC 6962 root over this block's leaves.
    pub tx_root: Hash,
    /// Size and root of the whole log after this block.
    pub log_size: u64,
    pub log_root: Hash,
    pub state_hash: Hash,
}

impl BlockHeader {
    pub fn hash(&self) -> Hash {
        let canonical = to_canonical_bytes(self).expect("headers are canonically encodable");
        Hash::digest_parts(&[BLOCK_PREFIX, &canonical])
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Block {
    pub header: BlockHeader,
    /// Present in block 0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub genesis: Option<GenesisConfig>,
    pub txs: Vec<SignedTx>,
    pub outcomes: Vec<TxOutcome>,
}

/// One leaf of the audit log: a transaction where it landed, with its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxLeaf {
    pub height: u64,
    pub position: u64,
    pub tx: SignedTx,
    pub outcome: TxOutcome,
}

/// Leaf 0 of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenesisLeaf {
    pub genesis: GenesisConfig,
}

/// The leaves a block adds to the log, in order, as the bytes that are hashed.
pub fn block_leaves(block: &Block) -> Vec<Vec<u8>> {
    if let Some(genesis) = &block.genesis {
        let leaf = GenesisLeaf {
            genesis: genesis.clone(),
        };
        return vec![to_canonical_bytes(&leaf).expect("genesis is canonically encodable")];
    }
    block
        .txs
        .iter()
        .zip(&block.outcomes)
        .enumerate()
        .map(|(position, (tx, outcome))| {
            tx_leaf_bytes(block.header.height, position as u64, tx, outcome)
        })
        .collect()
}

pub fn tx_leaf_bytes(height: u64, position: u64, tx: &SignedTx, outcome: &TxOutcome) -> Vec<u8> {
    let leaf = TxLeaf {
        height,
        position,
        tx: tx.clone(),
        outcome: outcome.clone(),
    };
    to_canonical_bytes(&leaf).expect("a block's transactions are canonically encodable")
}

/// The chain as of its last block: what the next block builds on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    pub chain_id: String,
    pub height: u64,
    pub block_hash: Hash,
    pub time_ms: u64,
    pub log_size: u64,
    pub log_root: Hash,
    pub state_hash: Hash,
}

impl ChainHead {
    pub fn of(header: &BlockHeader) -> ChainHead {
        ChainHead {
            chain_id: header.chain_id.clone(),
            height: header.height,
            block_hash: header.hash(),
            time_ms: header.time_ms,
            log_size: header.log_size,
            log_root: header.log_root,
            state_hash: header.state_hash,
        }
    }
}

/// A block with the state changes it makes and the head after it.
#[derive(Debug)]
pub struct ExecutedBlock {
    pub block: Block,
    pub writes: WriteSet,
    pub head: ChainHead,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("a block holds at most {BLOCK_TXS_MAX} transactions, not {count}")]
    TooManyTxs { count: usize },
    #[error("block time {time_ms} ms is before the previous block's {previous_ms} ms")]
    TimeWentBack { time_ms: u64, previous_ms: u64 },
    #[error("block is for chain {found:?}, not {expected:?}")]
    WrongChain { expected: String, found: String },
    #[error("block height {found} does not follow {expected}")]
    WrongHeight { expected: u64, found: u64 },
    #[error("block does not link to the previous block's hash")]
    WrongPrevHash,
    #[error("block has {txs} transactions but {outcomes} outcomes")]
    OutcomeCount { txs: usize, outcomes: usize },
    #[error("block {height}: {what} differs from re-execution")]
    Diverged { height: u64, what: &'static str },
    #[error("genesis is invalid: {0}")]
    Genesis(Rejection),
    #[error("a block after genesis carries a genesis configuration")]
    UnexpectedGenesis,
}

/// Reads Merkle nodes from state.
struct StateNodes<'o, 'a, S: StateRead + ?Sized>(&'o Overlay<'a, S>);

impl<S: StateRead + ?Sized> NodeSource for StateNodes<'_, '_, S> {
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        let bytes = self.0.get(&keys::merkle_node(level, index))?;
        Some(Hash(bytes.try_into().ok()?))
    }
}

/// Appends one leaf to the log kept in state; returns the new size.
fn append_leaf<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    size: u64,
    leaf_hash: Hash,
) -> u64 {
    let nodes = merkle::append(&StateNodes(state), size, leaf_hash)
        .expect("the log's perfect subtrees are all in state");
    for (level, index, hash) in nodes {
        state.put_raw(keys::merkle_node(level, index), hash.0.to_vec());
    }
    state.commit_tx();
    size + 1
}

fn log_root<S: StateRead + ?Sized>(state: &Overlay<'_, S>, size: u64) -> Hash {
    merkle::root(&StateNodes(state), size).expect("the log's perfect subtrees are all in state")
}

/// RFC 6962 Merkle tree hash of a list of leaf hashes.
pub fn tree_hash(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => merkle::empty_root(),
        1 => leaves[0],
        n => {
            let split = n.next_power_of_two() / 2;
            merkle::node_hash(&tree_hash(&leaves[..split]), &tree_hash(&leaves[split..]))
        }
    }
}

/// Builds block 0 from the genesis configuration: the chain's settings, its founding
/// members and their first users, every certificate checked.
pub fn genesis<S: StateRead + ?Sized>(
    base: &S,
    config: &GenesisConfig,
) -> Result<ExecutedBlock, BlockError> {
    let reject = BlockError::Genesis;
    if config.chain_id.is_empty() || config.chain_id.len() > 64 {
        return Err(reject(Rejection::invalid("chain_id", "1 to 64 bytes")));
    }
    let root_der = contracts::decode_certificate("root_certificate", &config.root_certificate)
        .map_err(reject)?;
    let root = crate::cert::parse_certificate(&root_der)
        .and_then(|info| crate::cert::verify_issued_by(&root_der, &root_der).map(|()| info))
        .and_then(|info| crate::cert::check_valid_at(&info, config.time_ms).map(|()| info))
        .map_err(|e| reject(Rejection::invalid("root_certificate", e.to_string())))?;
    if !root.is_ca {
        return Err(reject(Rejection::invalid(
            "root_certificate",
            "must be a CA",
        )));
    }
    if config.organisations.is_empty() {
        return Err(reject(Rejection::invalid(
            "organisations",
            "a consortium needs a member",
        )));
    }
    let mut state = Overlay::new(base);
    state.put(
        keys::CHAIN.to_string(),
        &ChainConfig {
            chain_id: config.chain_id.clone(),
            root_certificate: config.root_certificate.clone(),
            root_not_after_ms: root.not_after_ms,
        },
    );
    for org in &config.organisations {
        if state.contains(&keys::org(&org.id)) {
            return Err(reject(Rejection::AlreadyExists {
                what: format!("organisation {}", org.id),
            }));
        }
        let Some((first, others)) = org.members.split_first() else {
            return Err(reject(Rejection::invalid(
                "members",
                "each organisation needs an admin",
            )));
        };
        let (ca, admin) = contracts::governance_check_org(
            &root_der,
            &org.id,
            &org.ca_certificate,
            first,
            config.time_ms,
        )
        .map_err(reject)?;
        contracts::governance_admit(&mut state, &org.id, org.kind, &org.ca_certificate, &ca, 0);
        let mut members = vec![(admin, first)];
        let ca_der =
            contracts::decode_certificate("ca_certificate", &org.ca_certificate).map_err(reject)?;
        for member in others {
            let der = contracts::decode_certificate("members", member).map_err(reject)?;
            let info = contracts::governance_check_member(&der, &ca_der, &org.id, config.time_ms)
                .map_err(|detail| reject(Rejection::invalid("members", detail)))?;
            members.push((info, member));
        }
        for (info, der_text) in members {
            let user = contracts::governance_user(&info, der_text, 0);
            if state.contains(&keys::user(&user.id)) {
                return Err(reject(Rejection::AlreadyExists {
                    what: format!("user {}", user.id),
                }));
            }
            state.put(keys::user(&user.id), &user);
        }
    }
    state.commit_tx();
    let mut block = Block {
        header: BlockHeader {
            chain_id: config.chain_id.clone(),
            height: 0,
            prev_hash: Hash::ZERO,
            time_ms: config.time_ms,
            proposer: String::new(),
            tx_count: 0,
            tx_root: Hash::ZERO,
            log_size: 0,
            log_root: Hash::ZERO,
            state_hash: Hash::ZERO,
        },
        genesis: Some(config.clone()),
        txs: Vec::new(),
        outcomes: Vec::new(),
    };
    let leaves: Vec<Hash> = block_leaves(&block)
        .iter()
        .map(|l| merkle::leaf_hash(l))
        .collect();
    let size = append_leaf(&mut state, 0, leaves[0]);
    block.header.tx_root = tree_hash(&leaves);
    block.header.log_size = size;
    block.header.log_root = log_root(&state, size);
    let writes = state.into_writes();
    block.header.state_hash = next_state_hash(&Hash::ZERO, &writes);
    let head = ChainHead::of(&block.header);
    Ok(ExecutedBlock {
        block,
        writes,
        head,
    })
}

/// Adds the block's contributions to each organisation's counters: the proposer's
/// organisation led it; custodians hold the record versions and served the granted
/// accesses that committed in it. One write per organisation touched.
fn count_contributions<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    proposer: &str,
    txs: &[SignedTx],
    outcomes: &[TxOutcome],
) {
    let org_of = |id: &str| split_user_id(id).map(|(org, _)| org.to_string());
    fn entry(counts: &mut BTreeMap<String, Contribution>, org: String) -> &mut Contribution {
        counts.entry(org.clone()).or_insert_with(|| Contribution {
            org,
            ..Contribution::default()
        })
    }
    let mut counts: BTreeMap<String, Contribution> = BTreeMap::new();
    if let Some(org) = org_of(proposer) {
        entry(&mut counts, org).blocks_led += 1;
    }
    for (tx, outcome) in txs.iter().zip(outcomes) {
        let TxOutcome::Committed { access } = outcome else {
            continue;
        };
        let Some(org) = org_of(&tx.payload.signer) else {
            continue;
        };
        match (&tx.payload.body, access) {
            (TxBody::CreateRecord { .. }, _) => entry(&mut counts, org).records_held += 1,
            (TxBody::CreateRecords { versions }, _) => {
                entry(&mut counts, org).records_held += versions.len() as u64
            }
            (
                TxBody::LogAccess {
                    records,
                    custodians,
                    ..
                },
                Some(decision),
            ) if decision.is_granted() => {
                // Each custodian the entry lets the requester ask serves it once.
                let mut served: Vec<String> = custodians.clone();
                for record in records {
                    let (custodian, _) = crate::tx::access_record_name(record, &org);
                    if !served.iter().any(|c| c == custodian) {
                        served.push(custodian.to_string());
                    }
                }
                for custodian in served {
                    entry(&mut counts, custodian).accesses_served += 1;
                }
            }
            _ => {}
        }
    }
    for (org, add) in counts {
        let key = keys::contribution(&org);
        let mut total: Contribution = state.get_value(&key).unwrap_or(Contribution {
            org: org.clone(),
            ..Contribution::default()
        });
        total.blocks_led += add.blocks_led;
        total.records_held += add.records_held;
        total.accesses_served += add.accesses_served;
        state.put(key, &total);
    }
    state.commit_tx();
}

/// Orders `candidates` into the next block at `time_ms` (which must not go back in time).
pub fn execute_block<S: StateRead + ?Sized>(
    base: &S,
    head: &ChainHead,
    proposer: &str,
    time_ms: u64,
    candidates: Vec<Candidate>,
) -> Result<ExecutedBlock, BlockError> {
    if candidates.len() > BLOCK_TXS_MAX {
        return Err(BlockError::TooManyTxs {
            count: candidates.len(),
        });
    }
    if time_ms < head.time_ms {
        return Err(BlockError::TimeWentBack {
            time_ms,
            previous_ms: head.time_ms,
        });
    }
    let height = head.height + 1;
    let mut state = Overlay::new(base);
    // Read once per block: every transaction of the block is decided under it.
    let config = contracts::chain_config(&state);
    let mut size = head.log_size;
    let mut txs = Vec::with_capacity(candidates.len());
    let mut outcomes = Vec::with_capacity(candidates.len());
    let mut leaves = Vec::with_capacity(candidates.len());
    for (position, candidate) in candidates.into_iter().enumerate() {
        let placement = contracts::Placement {
            config: &config,
            height,
            time_ms,
            leaf_index: size,
        };
        let executed = contracts::execute(&mut state, candidate, &placement);
        let leaf = tx_leaf_bytes(height, position as u64, &executed.tx, &executed.outcome);
        let leaf_hash = merkle::leaf_hash(&leaf);
        size = append_leaf(&mut state, size, leaf_hash);
        leaves.push(leaf_hash);
        txs.push(executed.tx);
        outcomes.push(executed.outcome);
    }
    count_contributions(&mut state, proposer, &txs, &outcomes);
    let root = log_root(&state, size);
    let writes = state.into_writes();
    let header = BlockHeader {
        chain_id: head.chain_id.clone(),
        height,
        prev_hash: head.block_hash,
        time_ms,
        proposer: proposer.to_string(),
        tx_count: txs.len() as u64,
        tx_root: tree_hash(&leaves),
        log_size: size,
        log_root: root,
        state_hash: next_state_hash(&head.state_hash, &writes),
    };
    let head = ChainHead::of(&header);
    Ok(ExecutedBlock {
        block: Block {
            header,
            genesis: None,
            txs,
            outcomes,
        },
        writes,
        head,
    })
}

/// Re-executes a stored or received block on top of `head` and checks that it reproduces
/// the block exactly: links, outcomes, roots and state hash. `head` is None for block 0.
pub fn replay<S: StateRead + ?Sized>(
    base: &S,
    head: Option<&ChainHead>,
    block: &Block,
    verified: impl FnOnce(Vec<SignedTx>) -> Vec<Candidate>,
) -> Result<ExecutedBlock, BlockError> {
    let header = &block.header;
    let executed = match head {
        None => {
            let config = block.genesis.as_ref().ok_or(BlockError::WrongHeight {
                expected: 0,
                found: header.height,
            })?;
            genesis(base, config)?
        }
        Some(head) => {
            if block.genesis.is_some() {
                return Err(BlockError::UnexpectedGenesis);
            }
            if header.chain_id != head.chain_id {
                return Err(BlockError::WrongChain {
                    expected: head.chain_id.clone(),
                    found: header.chain_id.clone(),
                });
            }
            if header.height != head.height + 1 {
                return Err(BlockError::WrongHeight {
                    expected: head.height + 1,
                    found: header.height,
                });
            }
            if header.prev_hash != head.block_hash {
                return Err(BlockError::WrongPrevHash);
            }
            if block.txs.len() != block.outcomes.len() {
                return Err(BlockError::OutcomeCount {
                    txs: block.txs.len(),
                    outcomes: block.outcomes.len(),
                });
            }
            execute_block(
                base,
                head,
                &header.proposer,
                header.time_ms,
                verified(block.txs.clone()),
            )?
        }
    };
    let diverged = |what| BlockError::Diverged {
        height: header.height,
        what,
    };
    let rebuilt = &executed.block;
    if rebuilt.outcomes != block.outcomes {
        return Err(diverged("a transaction outcome"));
    }
    if rebuilt.txs != block.txs {
        return Err(diverged("a transaction"));
    }
    let fields: [(&'static str, bool); 6] = [
        ("tx_count", rebuilt.header.tx_count == header.tx_count),
        ("tx_root", rebuilt.header.tx_root == header.tx_root),
        ("log_size", rebuilt.header.log_size == header.log_size),
        ("log_root", rebuilt.header.log_root == header.log_root),
        ("state_hash", rebuilt.header.state_hash == header.state_hash),
        ("header", rebuilt.header == *header),
    ];
    if let Some((what, _)) = fields.iter().find(|(_, same)| !same) {
        return Err(diverged(what));
    }
    Ok(executed)
}
