//! `store check`: a custodian's record store against its ledger.
//!
//! For every version the ledger indexes at this custodian: the blob is there, is its content
//! id, has the organisation's envelope, opens under the organisation's key and the record's
//! binding, and matches the plaintext commitment on the ledger; so do the attachments the
//! decrypted resource names. Blobs that no indexed version names are listed as orphans:
//! versions sealed but never committed (refused, or never signed), harmless ciphertext.

use std::collections::BTreeSet;

use medledger_core::model::Record;
use medledger_core::state::keys;
use serde::Serialize;

use super::{RecordStore, LIST_MAX};
use crate::fhir;
use crate::keywrap::{EncryptionKeyPair, WrapContext};
use crate::records::RecordError;
use crate::sealing::{associated_data, content_id, open, open_part};
use crate::store::Store;

/// What `check_store` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub custodian: String,
    pub versions_checked: u64,
    pub attachments_checked: u64,
    pub blobs_seen: u64,
    /// Versions or attachments that are missing, altered or do not open.
    pub problems: Vec<Problem>,
    /// Blobs no indexed version names.
    pub orphans: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// `record_id@version`, or `record_id@version/attachment/N`.
    pub what: String,
    pub cid: String,
    pub problem: String,
}

/// Checks every version the ledger indexes at `org` against `records`.
pub fn check_store(
    ledger: &Store,
    records: &dyn RecordStore,
    org: &str,
    keys: &[EncryptionKeyPair],
) -> Result<CheckReport, RecordError> {
    let snapshot = ledger.snapshot()?;
    let mut report = CheckReport {
        custodian: org.to_string(),
        ..CheckReport::default()
    };
    let mut named: BTreeSet<String> = BTreeSet::new();
    let prefix = keys::record(org, "");
    snapshot.visit_keys(&prefix, |key| -> Result<(), RecordError> {
        let Some(record) = snapshot.value::<Record>(key)? else {
            return Ok(());
        };
        for version in &record.versions {
            report.versions_checked += 1;
            named.insert(version.cid.clone());
            let what = format!("{}@{}", record.record_id, version.version);
            let mut problem = |cid: &str, text: &str| {
                report.problems.push(Problem {
                    what: what.clone(),
                    cid: cid.to_string(),
                    problem: text.to_string(),
                })
            };
            let Some(blob) = records.get_blob(&version.cid)? else {
                problem(&version.cid, "missing from the store");
                continue;
            };
            if content_id(&blob) != version.cid {
                problem(&version.cid, "altered: not its content id");
                continue;
            }
            let Some(envelope) = records.get_envelope(&version.cid, org)? else {
                problem(&version.cid, "no envelope for the organisation");
                continue;
            };
            let context = WrapContext {
                record: &record.record_id,
                version: version.version,
                custodian: org,
                recipient: org,
            };
            let Some(data_key) = keys
                .iter()
                .rev()
                .find_map(|pair| pair.unwrap_key(&envelope, &context).ok())
            else {
                problem(
                    &version.cid,
                    "the envelope opens under no key of the organisation",
                );
                continue;
            };
            let binding = associated_data(org, &record.record_id, version.version, None);
            let Some(plaintext) = open(&blob, &data_key, &binding, &version.commitment) else {
                problem(
                    &version.cid,
                    "does not decrypt or does not match the ledger's commitment",
                );
                continue;
            };
            let Ok(resource) = serde_json::from_slice::<serde_json::Value>(&plaintext) else {
                problem(&version.cid, "the decrypted resource is not JSON");
                continue;
            };
            for (index, cid) in fhir::attachment_cids(&resource).iter().enumerate() {
                report.attachments_checked += 1;
                named.insert(cid.clone());
                let part = format!("attachment {index}");
                match records.get_blob(cid)? {
                    None => problem(cid, &format!("{part} missing from the store")),
                    Some(bytes) if content_id(&bytes) != *cid => {
                        problem(cid, &format!("{part} altered: not its content id"))
                    }
                    Some(bytes) => {
                        let binding =
                            associated_data(org, &record.record_id, version.version, Some(index));
                        if open_part(&bytes, &data_key, &binding).is_none() {
                            problem(cid, &format!("{part} does not decrypt"));
                        }
                    }
                }
            }
        }
        Ok(())
    })?;
    let mut after: Option<String> = None;
    loop {
        let page = records.blob_ids(after.as_deref(), LIST_MAX)?;
        let Some(last) = page.last() else { break };
        after = Some(last.clone());
        for cid in page {
            report.blobs_seen += 1;
            if !named.contains(&cid) {
                report.orphans.push(cid);
            }
        }
    }
    Ok(report)
}
