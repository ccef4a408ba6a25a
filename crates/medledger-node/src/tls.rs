//! Mutual TLS between member nodes (rustls, TLS 1.3 and 1.2 only, ring's primitives).
//!
//! Both sides present their node certificate and its organisation's CA. Who may connect is
//! decided by the ledger, not by a static trust store: `PeerCheck` accepts a certificate
//! only if it is the one the ledger enrolled for a node of an active member organisation,
//! and not revoked. A node that has not yet heard of an organisation (it is still catching
//! up) accepts a node certificate of it that chains to the consortium root through the CA it
//! presents. The handshake signatures themselves are checked by rustls.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};

use crate::ledger::NodeIdentity;

/// A peer the ledger vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// `name@org` of the peer node.
    pub node: String,
    pub org: String,
}

/// Decides whether a presented certificate chain belongs to a node that may connect now.
pub trait PeerCheck: Send + Sync {
    fn check(&self, end_entity: &[u8], intermediates: &[&[u8]]) -> Result<PeerIdentity, String>;
}

/// The client and server sides of this node's mutual TLS.
#[derive(Clone)]
pub struct TlsConfigs {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

#[derive(Debug, thiserror::Error)]
#[error("TLS setup: {0}")]
pub struct TlsSetupError(String);

/// The name a node's server identifies by in the handshake: its organisation id.
pub fn server_name(org: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(org.to_string()).map_err(|e| format!("{org:?} as a TLS name: {e}"))
}

pub fn configs(
    identity: &NodeIdentity,
    check: Arc<dyn PeerCheck>,
) -> Result<TlsConfigs, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    let chain = identity
        .certificate_chain
        .iter()
        .map(|text| {
            medledger_core::crypto::from_base64url(text)
                .map(CertificateDer::from)
                .map_err(|e| TlsSetupError(format!("a certificate of the node: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let key = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key.pkcs8_der().to_vec()));
    let verifier = Arc::new(LedgerVerifier {
        check,
        provider: provider.clone(),
    });
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsSetupError(e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain.clone(), key())
        .map_err(|e| TlsSetupError(e.to_string()))?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| TlsSetupError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key())
        .map_err(|e| TlsSetupError(e.to_string()))?;
    Ok(TlsConfigs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// Certificates checked against the ledger; handshake signatures by rustls (ring).
struct LedgerVerifier {
    check: Arc<dyn PeerCheck>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for LedgerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LedgerVerifier")
    }
}

fn refused(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(PeerRefused(reason)),
    )))
}

#[derive(Debug)]
struct PeerRefused(String);

impl fmt::Display for PeerRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer refused: {}", self.0)
    }
}

impl std::error::Error for PeerRefused {}

impl LedgerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<PeerIdentity, rustls::Error> {
        let intermediates: Vec<&[u8]> = intermediates.iter().map(|c| c.as_ref()).collect();
        self.check
            .check(end_entity.as_ref(), &intermediates)
            .map_err(refused)
    }
}

/// The handshake-signature half of both verifiers: rustls's own checks with ring's
/// algorithms.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algorithms = &self.provider.signature_verification_algorithms;
            verify_tls12_signature(message, cert, dss, algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algorithms = &self.provider.signature_verification_algorithms;
            verify_tls13_signature(message, cert, dss, algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

impl ClientCertVerifier for LedgerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

impl ServerCertVerifier for LedgerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let peer = self.check(end_entity, intermediates)?;
        // The node we meant to reach, not just any member's node.
        let expected = match server_name {
            ServerName::DnsName(name) => name.as_ref().to_string(),
            other => return Err(refused(format!("unexpected server name {other:?}"))),
        };
        if peer.org != expected {
            return Err(refused(format!(
                "expected the node of {expected}, found {}",
                peer.node
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}
