//! What a client needs to check the audit log without trusting the node that answers:
//! signed tree heads, inclusion and consistency proofs, and their verification.

use serde::{Deserialize, Serialize};

use crate::canonical::to_canonical_bytes;
use crate::cert::{check_valid_at, parse_certificate, verify_issued_by};
use crate::crypto::{from_base64url, Signature};
use crate::hash::Hash;
use crate::identity::{user_id, Role};
use crate::merkle;

/// Domain separation for tree-head signatures.
pub const TREE_HEAD_PREFIX: &[u8] = b"medledger/tree-head/v1\n";

/// The log's size and root after a block, as a node vouches for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeHead {
    pub chain_id: String,
    pub height: u64,
    pub log_size: u64,
    pub log_root: Hash,
    pub time_ms: u64,
}

impl TreeHead {
    pub fn signing_bytes(&self) -> Vec<u8> {
        let canonical = to_canonical_bytes(self).expect("tree heads are canonically encodable");
        [TREE_HEAD_PREFIX, &canonical].concat()
    }
}

/// A tree head signed by a node, with the certificates that tie the node to the root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedTreeHead {
    pub tree_head: TreeHead,
    /// `name@org` of the signing node.
    pub signer: String,
    pub signature: Signature,
    /// DER, base64url: the node's certificate, then its organisation's CA.
    pub certificate_chain: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("certificate chain: {0}")]
    Certificate(String),
    #[error("the tree head is signed by {signer:?}, whose certificate names {certified:?}")]
    SignerMismatch { signer: String, certified: String },
    #[error("the tree head signature does not verify")]
    BadSignature,
    #[error("the tree head is for chain {0:?}")]
    WrongChain(String),
    #[error("proof: {0}")]
    Proof(#[from] merkle::ProofError),
}

/// Checks a signed tree head against the consortium root the client trusts: the chain
/// node → organisation CA → root, the node role, validity at the head's time, and the
/// signature. Membership status is the ledger's business; this checks what a certificate can.
pub fn verify_tree_head(
    signed: &SignedTreeHead,
    trusted_root_der: &[u8],
    chain_id: &str,
) -> Result<(), AuditError> {
    let bad = |e: crate::cert::CertError| AuditError::Certificate(e.to_string());
    if signed.tree_head.chain_id != chain_id {
        return Err(AuditError::WrongChain(signed.tree_head.chain_id.clone()));
    }
    let [node_text, ca_text] = signed.certificate_chain.as_slice() else {
        return Err(AuditError::Certificate(
            "expected the node's certificate and its CA".to_string(),
        ));
    };
    let decode = |text: &str| {
        from_base64url(text).map_err(|_| AuditError::Certificate("not base64url".to_string()))
    };
    let (node_der, ca_der) = (decode(node_text)?, decode(ca_text)?);
    verify_issued_by(&ca_der, trusted_root_der).map_err(bad)?;
    verify_issued_by(&node_der, &ca_der).map_err(bad)?;
    let node = parse_certificate(&node_der).map_err(bad)?;
    let ca = parse_certificate(&ca_der).map_err(bad)?;
    let at_ms = signed.tree_head.time_ms;
    check_valid_at(&node, at_ms).map_err(bad)?;
    check_valid_at(&ca, at_ms).map_err(bad)?;
    if node.role != Some(Role::Node) || ca.organization != node.organization {
        return Err(AuditError::Certificate(
            "the signer is not a node of the CA's organisation".to_string(),
        ));
    }
    let certified = user_id(&node.organization, &node.common_name);
    if certified != signed.signer {
        return Err(AuditError::SignerMismatch {
            signer: signed.signer.clone(),
            certified,
        });
    }
    if !node
        .public_key
        .verify(&signed.tree_head.signing_bytes(), &signed.signature)
    {
        return Err(AuditError::BadSignature);
    }
    Ok(())
}

/// An inclusion proof for one leaf, as the node serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    pub leaf_index: u64,
    pub log_size: u64,
    /// The leaf's bytes (canonical JSON), so the client hashes them itself.
    pub leaf: serde_json::Value,
    pub path: Vec<Hash>,
}

/// Checks that `proof.leaf` is at `proof.leaf_index` in the log whose head is `root`.
pub fn verify_inclusion(proof: &InclusionProof, root: &Hash) -> Result<(), AuditError> {
    let bytes = crate::canonical::canonical_value_bytes(&proof.leaf)
        .map_err(|e| AuditError::Certificate(e.to_string()))?;
    merkle::verify_inclusion(
        &merkle::leaf_hash(&bytes),
        proof.leaf_index,
        proof.log_size,
        &proof.path,
        root,
    )?;
    Ok(())
}

/// A consistency proof between two sizes of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyProof {
    pub old_size: u64,
    pub new_size: u64,
    pub path: Vec<Hash>,
}
