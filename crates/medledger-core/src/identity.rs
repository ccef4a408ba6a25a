//! Who acts on the ledger: member organisations, their users, and patients.
//!
//! Names follow the Fabric MSP model: every organisation has a CA under the consortium
//! root, every user a certificate from their organisation's CA carrying a role. Patients
//! hold their own key and appear on the ledger only as a pseudonym derived from it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::crypto::PublicKey;
use crate::hash::Hash;

/// Longest organisation id or user name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;

/// What kind of member an organisation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrgKind {
    Hospital,
    Clinic,
    Lab,
    Insurer,
    Regulator,
}

/// A user's role, carried in the organisational unit (OU) of their certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Clinician,
    Nurse,
    Radiologist,
    LabTechnician,
    OrgAdmin,
    Auditor,
    Node,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Clinician,
        Role::Nurse,
        Role::Radiologist,
        Role::LabTechnician,
        Role::OrgAdmin,
        Role::Auditor,
        Role::Node,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Clinician => "clinician",
            Role::Nurse => "nurse",
            Role::Radiologist => "radiologist",
            Role::LabTechnician => "lab_technician",
            Role::OrgAdmin => "org_admin",
            Role::Auditor => "auditor",
            Role::Node => "node",
        }
    }

    /// Roles that author clinical records.
    pub fn writes_records(self) -> bool {
        matches!(
            self,
            Role::Clinician | Role::Nurse | Role::Radiologist | Role::LabTechnician
        )
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(text: &str) -> Result<Role, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == text)
            .ok_or_else(|| UnknownRole(text.to_string()))
    }
}

impl OrgKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OrgKind::Hospital => "hospital",
            OrgKind::Clinic => "clinic",
            OrgKind::Lab => "lab",
            OrgKind::Insurer => "insurer",
            OrgKind::Regulator => "regulator",
        }
    }
}

/// True for names made of `[a-z0-9-]`, 1 to `NAME_BYTES_MAX` bytes, starting with a letter
/// or digit: organisation ids and user names appear in keys, URLs and certificates.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

/// A user is named `name@org`, from the CN and O of their certificate.
pub fn user_id(org: &str, name: &str) -> String {
    format!("{name}@{org}")
}

/// Splits `name@org`.
pub fn split_user_id(id: &str) -> Option<(&str, &str)> {
    let (name, org) = id.split_once('@')?;
    (is_valid_name(name) && is_valid_name(org)).then_some((org, name))
}

/// A patient's pseudonym: `pt-` and the first 20 bytes of SHA-256 over a domain tag and
/// the patient's public key, in hex. It reveals nothing about the person and is the same
/// on every node.
pub fn patient_pseudonym(key: &PublicKey) -> String {
    let digest = Hash::digest_parts(&[b"medledger/patient/v1\0", key.as_bytes()]);
    format!("pt-{}", hex::encode(&digest.0[..20]))
}

/// True for strings of the pseudonym's shape.
pub fn is_patient_pseudonym(text: &str) -> bool {
    text.len() == 43
        && text.starts_with("pt-")
        && text[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_their_certificate_spelling() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("surgeon".parse::<Role>().is_err());
    }

    #[test]
    fn names_and_user_ids_accept_only_the_safe_alphabet() {
        for good in ["hospital-a", "lab1", "a"] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "-a", "Hospital", "a b", "a/b", "a@b", &"a".repeat(65)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
        assert_eq!(
            split_user_id("alice@hospital-a"),
            Some(("hospital-a", "alice"))
        );
        assert_eq!(split_user_id("alice"), None);
        assert_eq!(split_user_id("a@b@c"), None);
    }
}
