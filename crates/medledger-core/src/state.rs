//! Replicated state as an ordered key-value map, read through a trait and changed only
//! through write sets.
//!
//! The core never owns storage: it reads through `StateRead` (the node implements it over
//! its embedded store, tests over a `BTreeMap`) and returns every change as a `WriteSet`
//! for the shell to persist atomically with the block. Values of domain types are stored
//! in the canonical encoding, so equal state is equal bytes on every node.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::canonical::to_canonical_bytes;
use crate::hash::Hash;

/// Read access to committed state.
pub trait StateRead {
    fn get(&self, key: &str) -> Option<Vec<u8>>;
}

impl StateRead for BTreeMap<String, Vec<u8>> {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        BTreeMap::get(self, key).cloned()
    }
}

/// Changes to state: key → new value, or None to delete. Ordered, so its digest is too.
pub type WriteSet = BTreeMap<String, Option<Vec<u8>>>;

/// Applies a write set to an in-memory state.
pub fn apply_writes(state: &mut BTreeMap<String, Vec<u8>>, writes: &WriteSet) {
    for (key, value) in writes {
        match value {
            Some(value) => state.insert(key.clone(), value.clone()),
            None => state.remove(key),
        };
    }
}

/// The state hash after a block: SHA-256 over the previous state hash and the block's
/// write set, each key and value length-prefixed. Two nodes agree on it exactly when they
/// agree on the previous state and made the same changes, so a diverging node is caught at
/// the first block where it differs, at the cost of one pass over the changes, not the state.
pub fn next_state_hash(previous: &Hash, writes: &WriteSet) -> Hash {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(b"medledger/state/v1\0");
    context.update(&previous.0);
    for (key, value) in writes {
        context.update(&(key.len() as u64).to_be_bytes());
        context.update(key.as_bytes());
        match value {
            Some(value) => {
                context.update(&[1]);
                context.update(&(value.len() as u64).to_be_bytes());
                context.update(value);
            }
            None => context.update(&[0]),
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    Hash(out)
}

/// Pending writes layered over committed state: a block's writes, and inside them one
/// transaction's, which are kept only if the transaction commits.
pub struct Overlay<'a, S: StateRead + ?Sized> {
    base: &'a S,
    block: WriteSet,
    tx: WriteSet,
}

impl<'a, S: StateRead + ?Sized> Overlay<'a, S> {
    pub fn new(base: &'a S) -> Self {
        Overlay {
            base,
            block: WriteSet::new(),
            tx: WriteSet::new(),
        }
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        if let Some(value) = self.tx.get(key) {
            return value.clone();
        }
        if let Some(value) = self.block.get(key) {
            return value.clone();
        }
        self.base.get(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Reads a value stored by `put`. A value that does not decode means the store is
    /// corrupt or a bug wrote it: neither can be answered with a decision, so it stops.
    pub fn get_value<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let bytes = self.get(key)?;
        match serde_json::from_slice(&bytes) {
            Ok(value) => Some(value),
            Err(error) => panic!("state value at {key:?} does not decode: {error}"),
        }
    }

    pub fn put<T: Serialize + ?Sized>(&mut self, key: String, value: &T) {
        let bytes = to_canonical_bytes(value).expect("state values are canonically encodable");
        self.tx.insert(key, Some(bytes));
    }

    pub fn put_raw(&mut self, key: String, value: Vec<u8>) {
        self.tx.insert(key, Some(value));
    }

    /// Removes `key`: the write set carries the deletion, and the state hash with it.
    pub fn delete(&mut self, key: String) {
        self.tx.insert(key, None);
    }

    /// Keeps the current transaction's writes.
    pub fn commit_tx(&mut self) {
        let writes = std::mem::take(&mut self.tx);
        self.block.extend(writes);
    }

    /// Drops the current transaction's writes.
    pub fn discard_tx(&mut self) {
        self.tx.clear();
    }

    /// The block's writes. Pending transaction writes must have been committed or dropped.
    pub fn into_writes(self) -> WriteSet {
        assert!(
            self.tx.is_empty(),
            "a transaction's writes were left pending"
        );
        self.block
    }
}

/// The state's key layout, in one place. Numbers are fixed-width hex so keys sort in
/// numeric order, which the node's range queries rely on.
pub mod keys {
    use crate::hash::Hash;

    pub const CHAIN: &str = "chain";
    pub const ORGS: &str = "orgs";
    pub const PROPOSAL_SEQ: &str = "proposal_seq";

    pub fn org(org: &str) -> String {
        format!("org/{org}")
    }
    pub fn user(user: &str) -> String {
        format!("user/{user}")
    }
    pub fn patient(patient: &str) -> String {
        format!("patient/{patient}")
    }
    /// The encryption key a patient or an organisation publishes for wrapped record keys.
    pub fn encryption_key(party: &str) -> String {
        format!("encryption_key/{party}")
    }
    /// What an organisation has contributed (blocks led, records held, accesses served).
    pub fn contribution(org: &str) -> String {
        format!("contribution/{org}")
    }
    pub fn nonce(signer: &str) -> String {
        format!("nonce/{signer}")
    }
    pub fn record(custodian: &str, record_id: &str) -> String {
        format!("record/{custodian}/{record_id}")
    }
    /// Patient's record index entry; the value is empty.
    pub fn patient_record(patient: &str, custodian: &str, record_id: &str) -> String {
        format!("{}{custodian}/{record_id}", patient_records_prefix(patient))
    }
    pub fn patient_records_prefix(patient: &str) -> String {
        format!("patient_record/{patient}/")
    }
    pub fn consent(id: &Hash) -> String {
        format!("consent/{id}")
    }
    /// How many of the patient's consent slots are in use (absent when none). Slots `0..count`
    /// hold the ids of the patient's consents that may still be in force, in no particular
    /// order: the policy reads them on every decision, a revoke frees its slot at once, and
    /// expired consents are pruned when the slots are full. One key per consent keeps the
    /// writes of a grant and of a revoke constant, whatever the patient holds.
    pub fn patient_consent_count(patient: &str) -> String {
        format!("patient_consent_count/{patient}")
    }
    /// One of the patient's consent slots: the id of a consent that may still be in force.
    pub fn patient_consent_slot(patient: &str, slot: u64) -> String {
        format!("patient_consent_slot/{patient}/{slot:016x}")
    }
    /// The earliest end a consent in the patient's slots may have: none of them ends before
    /// it (absent when none of them ends). Kept when a consent enters a slot and set exactly
    /// when the slots are pruned, so a grant at the bound looks at every slot only when one
    /// of them may have ended. A revoke leaves it as it is: a lower bound stays one.
    pub fn patient_consent_next_end(patient: &str) -> String {
        format!("patient_consent_next_end/{patient}")
    }
    /// The slot a consent occupies, while it occupies one: how a revoke finds it.
    pub fn consent_slot(id: &Hash) -> String {
        format!("consent_slot/{id}")
    }
    /// History index of every consent a patient granted; the value is empty.
    pub fn patient_consent(patient: &str, id: &Hash) -> String {
        format!("{}{id}", patient_consent_prefix(patient))
    }
    pub fn patient_consent_prefix(patient: &str) -> String {
        format!("patient_consent/{patient}/")
    }
    pub fn request(id: &Hash) -> String {
        format!("request/{id}")
    }
    pub fn patient_request(patient: &str, id: &Hash) -> String {
        format!("{}{id}", patient_request_prefix(patient))
    }
    pub fn patient_request_prefix(patient: &str) -> String {
        format!("patient_request/{patient}/")
    }
    pub fn break_glass(id: &Hash) -> String {
        format!("break_glass/{id}")
    }
    /// Ids of the patient's break-glass openings whose window has not ended (pruned).
    pub fn patient_break_glass(patient: &str) -> String {
        format!("patient_break_glass/{patient}")
    }
    /// The earliest end a window in the patient's break-glass list may have: none of them
    /// ends before it. Kept when a window opens and set exactly when the list is pruned, so
    /// a break-glass finding the list full reads its windows only when one may have ended.
    /// Absent while the list is empty, or over a list stored before it was kept.
    pub fn patient_break_glass_next_end(patient: &str) -> String {
        format!("patient_break_glass_next_end/{patient}")
    }
    /// History index of every break-glass opened for a patient; the value is empty.
    pub fn patient_break_glass_entry(patient: &str, id: &Hash) -> String {
        format!("{}{id}", patient_break_glass_prefix(patient))
    }
    pub fn patient_break_glass_prefix(patient: &str) -> String {
        format!("patient_break_glass_entry/{patient}/")
    }
    pub fn proposal(id: u64) -> String {
        format!("proposal/{id:016x}")
    }
    pub fn merkle_node(level: u32, index: u64) -> String {
        format!("merkle/{level:02x}/{index:016x}")
    }
    pub fn event(leaf_index: u64) -> String {
        format!("event/{leaf_index:016x}")
    }
    pub fn event_by_patient(patient: &str, leaf_index: u64) -> String {
        format!("{}{leaf_index:016x}", event_by_patient_prefix(patient))
    }
    pub fn event_by_patient_prefix(patient: &str) -> String {
        format!("event_by_patient/{patient}/")
    }
    pub fn event_by_actor(actor: &str, leaf_index: u64) -> String {
        format!("{}{leaf_index:016x}", event_by_actor_prefix(actor))
    }
    pub fn event_by_actor_prefix(actor: &str) -> String {
        format!("event_by_actor/{actor}/")
    }
    pub fn event_by_record(custodian: &str, record_id: &str, leaf_index: u64) -> String {
        format!(
            "{}{leaf_index:016x}",
            event_by_record_prefix(custodian, record_id)
        )
    }
    pub fn event_by_record_prefix(custodian: &str, record_id: &str) -> String {
        format!("event_by_record/{custodian}/{record_id}/")
    }
    /// Where a transaction landed: its leaf index in the Merkle log.
    pub fn tx(id: &Hash) -> String {
        format!("tx/{id}")
    }
}
