//! Key material of a consortium and its members, and signing of transactions.
//!
//! The authority's root, each organisation's CA, and the identities of users, nodes and
//! patients. An identity is saved as one JSON file (private key included, mode 0600) that
//! the CLI signs with; the ledger itself only ever sees public keys and certificates.

use std::path::Path;

use medledger_core::block::{GenesisConfig, GenesisOrg};
use medledger_core::crypto::{base64url, from_base64url};
use medledger_core::identity::{patient_pseudonym, user_id, OrgKind, Role};
use medledger_core::tx::{SignedTx, TxBody, TxPayload};
use serde::{Deserialize, Serialize};

use crate::keywrap::EncryptionKeyPair;
use crate::pki::{issue_member, issue_org_ca, issue_root, IssuedCert, KeyPair, PkiError, Validity};

/// Signs a payload: the signature covers exactly `payload.signing_bytes()`.
pub fn sign(payload: TxPayload, key: &KeyPair) -> SignedTx {
    let bytes = payload
        .signing_bytes()
        .expect("payloads built by this crate are canonically encodable");
    SignedTx {
        signature: key.sign(&bytes),
        payload,
    }
}

/// Anyone who signs: a member (user or node, with a certificate) or a patient.
pub struct Identity {
    /// `name@org` or the patient's pseudonym.
    pub id: String,
    pub key: KeyPair,
    /// The member's certificate and their organisation's CA; None for patients.
    pub certificate: Option<IssuedCert>,
    pub ca_certificate: Option<IssuedCert>,
    /// Key pairs that record keys are wrapped for (patients and nodes), oldest first. The
    /// last is the one to publish; older ones stay to open what was wrapped for them.
    pub encryption_keys: Vec<EncryptionKeyPair>,
}

/// The saved form of an identity.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    id: String,
    /// PKCS#8 DER, base64url.
    private_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_certificate: Option<String>,
    /// P-256 secret scalars, base64url, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    encryption_keys: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{0}: a node identity needs its certificate and its organisation's CA")]
    NotANode(String),
}

impl Identity {
    /// A new patient with a fresh signing key and a fresh encryption key.
    pub fn new_patient() -> Result<Identity, PkiError> {
        let key = KeyPair::generate()?;
        Ok(Identity {
            id: patient_pseudonym(&key.public_key()),
            key,
            certificate: None,
            ca_certificate: None,
            encryption_keys: vec![EncryptionKeyPair::generate()],
        })
    }

    /// The encryption key pair to publish, if this identity has one.
    pub fn encryption_key(&self) -> Option<&EncryptionKeyPair> {
        self.encryption_keys.last()
    }

    /// Adds a fresh encryption key pair, which becomes the one to publish. Older pairs stay:
    /// versions wrapped for them before the new key is on the ledger still open.
    pub fn rotate_encryption_key(&mut self) -> &EncryptionKeyPair {
        self.encryption_keys.push(EncryptionKeyPair::generate());
        self.encryption_keys.last().expect("just pushed")
    }

    /// Builds and signs a transaction from this identity.
    pub fn sign(&self, chain_id: &str, nonce: u64, expires_at_ms: u64, body: TxBody) -> SignedTx {
        sign(
            TxPayload {
                chain_id: chain_id.to_string(),
                signer: self.id.clone(),
                nonce,
                expires_at_ms,
                body,
            },
            &self.key,
        )
    }

    /// The certificate as ledger JSON carries it (DER, base64url).
    pub fn certificate_text(&self) -> Option<String> {
        self.certificate.as_ref().map(|c| base64url(&c.der))
    }

    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let file = IdentityFile {
            id: self.id.clone(),
            private_key: base64url(self.key.pkcs8_der()),
            certificate: self.certificate_text(),
            ca_certificate: self.ca_certificate.as_ref().map(|c| base64url(&c.der)),
            encryption_keys: self
                .encryption_keys
                .iter()
                .map(|pair| base64url(&pair.secret_bytes()))
                .collect(),
        };
        let text = serde_json::to_string_pretty(&file).expect("identity files encode");
        write_private(path, text.as_bytes())
    }

    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        let error = |detail: String| IdentityError::File {
            path: path.display().to_string(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let file: IdentityFile = serde_json::from_str(&text).map_err(|e| error(e.to_string()))?;
        let decode = |text: &str| from_base64url(text).map_err(|e| error(e.to_string()));
        let cert = |text: &Option<String>| -> Result<Option<IssuedCert>, IdentityError> {
            text.as_deref()
                .map(|t| decode(t).map(|der| IssuedCert { der }))
                .transpose()
        };
        let encryption_keys = file
            .encryption_keys
            .iter()
            .map(|text| {
                EncryptionKeyPair::from_secret_bytes(&decode(text)?)
                    .map_err(|e| error(format!("encryption key: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Identity {
            key: KeyPair::from_pkcs8_der(&decode(&file.private_key)?)?,
            certificate: cert(&file.certificate)?,
            ca_certificate: cert(&file.ca_certificate)?,
            id: file.id,
            encryption_keys,
        })
    }
}

/// Writes a file readable only by its owner (it holds a private key).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    use std::io::Write;
    let error = |e: std::io::Error| IdentityError::File {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(error)?;
    file.write_all(bytes).map_err(error)?;
    file.sync_all().map_err(error)
}

/// An organisation's CA and the members issued so far.
pub struct OrgAuthority {
    pub id: String,
    pub kind: OrgKind,
    pub ca_key: KeyPair,
    pub ca_certificate: IssuedCert,
}

impl OrgAuthority {
    /// Creates a CA for `id` under the consortium root.
    pub fn create(
        root: &RootAuthority,
        id: &str,
        kind: OrgKind,
        validity: Validity,
    ) -> Result<OrgAuthority, PkiError> {
        let ca_key = KeyPair::generate()?;
        let ca_certificate = issue_org_ca(&root.key, &root.certificate, id, &ca_key, validity)?;
        Ok(OrgAuthority {
            id: id.to_string(),
            kind,
            ca_key,
            ca_certificate,
        })
    }

    /// Issues a member with a fresh key; a node also gets its organisation's encryption key
    /// pair (one node per organisation; a second node of the organisation shares the file).
    pub fn issue(&self, name: &str, role: Role, validity: Validity) -> Result<Identity, PkiError> {
        let key = KeyPair::generate()?;
        let certificate = issue_member(
            &self.ca_key,
            &self.ca_certificate,
            &self.id,
            name,
            role,
            &key.public_key(),
            validity,
        )?;
        Ok(Identity {
            id: user_id(&self.id, name),
            key,
            certificate: Some(certificate),
            ca_certificate: Some(self.ca_certificate.clone()),
            encryption_keys: if role == Role::Node {
                vec![EncryptionKeyPair::generate()]
            } else {
                Vec::new()
            },
        })
    }

    /// The CA as an identity file (its key signs member certificates, never transactions).
    pub fn as_identity(&self) -> Identity {
        Identity {
            id: format!("ca@{}", self.id),
            key: KeyPair::from_pkcs8_der(self.ca_key.pkcs8_der()).expect("own key re-reads"),
            certificate: Some(self.ca_certificate.clone()),
            ca_certificate: None,
            encryption_keys: Vec::new(),
        }
    }

    pub fn from_identity(identity: Identity, kind: OrgKind) -> Result<OrgAuthority, IdentityError> {
        let certificate = identity.certificate.ok_or_else(|| IdentityError::File {
            path: identity.id.clone(),
            detail: "a CA identity needs its certificate".into(),
        })?;
        let id = certificate.info().map_err(PkiError::from)?.organization;
        Ok(OrgAuthority {
            id,
            kind,
            ca_key: identity.key,
            ca_certificate: certificate,
        })
    }
}

/// The consortium authority's root.
pub struct RootAuthority {
    pub chain_id: String,
    pub key: KeyPair,
    pub certificate: IssuedCert,
}

impl RootAuthority {
    pub fn create(chain_id: &str, validity: Validity) -> Result<RootAuthority, PkiError> {
        let key = KeyPair::generate()?;
        let certificate = issue_root(chain_id, &key, validity)?;
        Ok(RootAuthority {
            chain_id: chain_id.to_string(),
            key,
            certificate,
        })
    }
}

/// A founding member: its CA, its first admin and its node.
pub struct FoundingOrg {
    pub authority: OrgAuthority,
    pub admin: Identity,
    pub node: Identity,
}

/// Everything needed to start a consortium.
pub struct Consortium {
    pub root: RootAuthority,
    pub orgs: Vec<FoundingOrg>,
    pub genesis: GenesisConfig,
}

impl Consortium {
    /// Creates the root, a CA, an admin (`admin@org`) and a node (`node@org`) per
    /// organisation, and the genesis configuration that enrolls them.
    pub fn create(
        chain_id: &str,
        orgs: &[(&str, OrgKind)],
        genesis_time_ms: u64,
        validity: Validity,
    ) -> Result<Consortium, PkiError> {
        let root = RootAuthority::create(chain_id, validity)?;
        let mut founding = Vec::new();
        for (id, kind) in orgs {
            let authority = OrgAuthority::create(&root, id, *kind, validity)?;
            let admin = authority.issue("admin", Role::OrgAdmin, validity)?;
            let node = authority.issue("node", Role::Node, validity)?;
            founding.push(FoundingOrg {
                authority,
                admin,
                node,
            });
        }
        let genesis = GenesisConfig {
            chain_id: chain_id.to_string(),
            time_ms: genesis_time_ms,
            root_certificate: base64url(&root.certificate.der),
            organisations: founding
                .iter()
                .map(|org| GenesisOrg {
                    id: org.authority.id.clone(),
                    kind: org.authority.kind,
                    ca_certificate: base64url(&org.authority.ca_certificate.der),
                    members: vec![
                        org.admin
                            .certificate_text()
                            .expect("members have certificates"),
                        org.node
                            .certificate_text()
                            .expect("members have certificates"),
                    ],
                })
                .collect(),
        };
        Ok(Consortium {
            root,
            orgs: founding,
            genesis,
        })
    }

    pub fn org(&self, id: &str) -> Option<&FoundingOrg> {
        self.orgs.iter().find(|org| org.authority.id == id)
    }
}
