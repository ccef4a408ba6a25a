//! Patients register themselves: the ledger learns a public key and its pseudonym, nothing else.

use crate::model::{AuditEvent, Patient};
use crate::state::{keys, Overlay, StateRead};

use super::{Rejection, TxContext};

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
