//! Patients register themselves: the ledger learns a public key and its pseudonym, nothing
//! else. Patients and organisations publish the encryption keys record keys are wrapped for.

use crate::crypto::from_base64url;
use crate::hash::Hash;
use crate::identity::Role;
use crate::model::{AuditEvent, EncryptionKey, Patient};
use crate::state::{keys, Overlay, StateRead};
use crate::tx::TxBody;

use super::{Rejection, Signer, TxContext};

/// Bytes of an uncompressed SEC1 P-256 point: the tag 0x04 and two 32-byte coordinates.
pub const ENCRYPTION_KEY_BYTES: usize = 65;

pub(super) fn register<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    context: &TxContext<'_>,
    event: &mut AuditEvent,
) -> Result<(), Rejection> {
    let patient = context.signer.patient()?;
    // `resolve_signer` already refused an existing pseudonym or a key that is not the signer's.
    let value = Patient {
        id: patient.id.clone(),
        public_key: patient.public_key.clone(),
        registered_height: context.height,
    };
    event.patient = Some(value.id.clone());
    state.put(keys::patient(&value.id), &value);
    Ok(())
}

/// A patient publishes their own key; an admin or node publishes its organisation's. The
/// point's form is checked here; whether it lies on the curve is checked by every node
/// before it admits the transaction and again by whoever wraps a key for it.
pub(super) fn set_encryption_key<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    context: &TxContext<'_>,
    body: &TxBody,
    event: &mut AuditEvent,
) -> Result<(), Rejection> {
    let TxBody::SetEncryptionKey { public_key } = body else {
        unreachable!("dispatch routes only set_encryption_key here")
    };
    let party = match context.signer {
        Signer::Patient(patient) => {
            event.patient = Some(patient.id.clone());
            patient.id.clone()
        }
        Signer::User { .. } => {
            let (_, org) = context
                .signer
                .member_with_role(&[Role::OrgAdmin, Role::Node])?;
            org.id.clone()
        }
    };
    let bytes = from_base64url(public_key)
        .ok()
        .filter(|b| b.len() == ENCRYPTION_KEY_BYTES && b[0] == 0x04)
        .ok_or_else(|| {
            Rejection::invalid(
                "public_key",
                "must be an uncompressed P-256 point (65 bytes), base64url",
            )
        })?;
    let value = EncryptionKey {
        party: party.clone(),
        public_key: public_key.clone(),
        key_id: Hash::digest(&bytes),
        set_by: context.signer.id().to_string(),
        tx_id: context.tx_id,
        height: context.height,
    };
    state.put(keys::encryption_key(&party), &value);
    Ok(())
}
