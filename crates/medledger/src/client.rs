//! A blocking client of a node's HTTP API, as the CLI and the demo use it.

use std::time::Duration;

use medledger_core::contracts::{Rejection, TxOutcome};
use medledger_core::tx::{SignedTx, TxBody};
use medledger_node::api::SubmitResponse;
use medledger_node::consortium::Identity;
use medledger_node::ledger::now_ms;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How long a signed transaction stays valid.
pub const TX_LIFETIME_MS: u64 = 5 * 60 * 1000;
/// Largest answer read: a record version with its attachments, base64url.
const RESPONSE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Deadline of every request.
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// How often a transaction refused for a nonce another signer took is signed again.
const STALE_NONCE_RETRIES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: {detail}")]
    Transport { url: String, detail: String },
    #[error("the node refused ({status} {code}): {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        /// The transaction the refusal is about (an access entry that denied, say).
        tx_id: Option<String>,
    },
    #[error("unexpected answer from {url}: {detail}")]
    Decode { url: String, detail: String },
}

pub struct Client {
    base: String,
    agent: ureq::Agent,
    /// An access token from the node, sent with every request (the record endpoints act
    /// only for the user a token names).
    bearer: Option<String>,
}

impl Client {
    pub fn new(base: &str) -> Client {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(REQUEST_TIMEOUT_MS)))
            .http_status_as_error(false)
            .build();
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent: config.into(),
            bearer: None,
        }
    }

    /// A client that sends `token` (an access token from `medledger token`) with every
    /// request.
    pub fn with_token(base: &str, token: &str) -> Client {
        Client {
            bearer: Some(format!("Bearer {}", token.trim())),
            ..Client::new(base)
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.get(&url);
        if let Some(bearer) = &self.bearer {
            request = request.header("Authorization", bearer);
        }
        let response = request.call().map_err(|e| ClientError::Transport {
            url: url.clone(),
            detail: e.to_string(),
        })?;
        decode(&url, response)
    }

    pub fn submit(&self, tx: &SignedTx) -> Result<SubmitResponse, ClientError> {
        self.post("/v1/transactions", tx)
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.post(&url);
        if let Some(bearer) = &self.bearer {
            request = request.header("Authorization", bearer);
        }
        let response = request
            .send_json(body)
            .map_err(|e| ClientError::Transport {
                url: url.clone(),
                detail: e.to_string(),
            })?;
        decode(&url, response)
    }

    /// The chain id the node serves.
    pub fn chain_id(&self) -> Result<String, ClientError> {
        let status: Value = self.get("/v1/status")?;
        Ok(status["chain_id"].as_str().unwrap_or_default().to_string())
    }

    /// The signer's next nonce: one above the last the ledger accepted.
    pub fn next_nonce(&self, signer: &str) -> Result<u64, ClientError> {
        let answer: Value = self.get(&format!("/v1/nonces/{signer}"))?;
        Ok(answer["last_nonce"].as_u64().unwrap_or(0) + 1)
    }

    /// Signs `body` as `identity` with its next nonce and submits it; answers after commit.
    ///
    /// A node the person logs in at signs for them too, so between reading the nonce and
    /// the block another of their transactions may take it. The ledger then refuses this
    /// one as stale, which changes nothing but the log; it is signed again with the next
    /// nonce, at most `STALE_NONCE_RETRIES` times. Any other outcome is the answer.
    pub fn send(&self, identity: &Identity, body: TxBody) -> Result<SubmitResponse, ClientError> {
        self.send_with_nonces(identity, body, |client| client.next_nonce(&identity.id))
    }

    /// `send`, taking each attempt's nonce from `next_nonce`.
    fn send_with_nonces(
        &self,
        identity: &Identity,
        body: TxBody,
        mut next_nonce: impl FnMut(&Client) -> Result<u64, ClientError>,
    ) -> Result<SubmitResponse, ClientError> {
        let chain_id = self.chain_id()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let nonce = next_nonce(self)?;
            let tx = identity.sign(&chain_id, nonce, now_ms() + TX_LIFETIME_MS, body.clone());
            let response = self.submit(&tx)?;
            if !stale(&response) || attempt > STALE_NONCE_RETRIES {
                return Ok(response);
            }
        }
    }
}

fn decode<T: DeserializeOwned>(
    url: &str,
    response: ureq::http::Response<ureq::Body>,
) -> Result<T, ClientError> {
    let status = response.status().as_u16();
    let body: Value = response
        .into_body()
        .with_config()
        .limit(RESPONSE_BYTES_MAX)
        .read_json()
        .map_err(|e| ClientError::Decode {
            url: url.to_string(),
            detail: e.to_string(),
        })?;
    if status >= 400 {
        let error = &body["error"];
        return Err(ClientError::Api {
            status,
            code: error["code"].as_str().unwrap_or("unknown").to_string(),
            message: error["message"].as_str().unwrap_or_default().to_string(),
            tx_id: error["tx_id"].as_str().map(str::to_string),
        });
    }
    serde_json::from_value(body).map_err(|e| ClientError::Decode {
        url: url.to_string(),
        detail: e.to_string(),
    })
}

/// Whether the ledger refused a transaction because its nonce was already taken.
fn stale(response: &SubmitResponse) -> bool {
    matches!(
        response.outcome,
        TxOutcome::Rejected {
            rejection: Rejection::StaleNonce { .. }
        }
    )
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use medledger_core::identity::OrgKind;
    use medledger_node::consortium::Consortium;
    use medledger_node::ledger::OrderingConfig;

    use super::*;
    use crate::bench::grant_body;
    use crate::commands::{init_node, validity_days};

    #[test]
    fn a_nonce_another_signer_took_is_replaced_and_other_refusals_are_answered_as_they_are() {
        // Goal: against a real node, a transaction whose nonce another signer for the same
        // person took first is signed again with the next nonce and commits; a nonce that
        // stays stale is given up after `STALE_NONCE_RETRIES` more attempts with the
        // ledger's refusal as the answer; any other refusal is answered at once.
        let dir = tempfile::tempdir().unwrap();
        let consortium = Consortium::create(
            "medledger-client-test",
            &[("hospital-a", OrgKind::Hospital)],
            now_ms(),
            validity_days(1),
        )
        .unwrap();
        init_node(dir.path(), &consortium.genesis, &consortium.orgs[0].node).unwrap();
        let node = crate::node_runner::start(dir.path(), "127.0.0.1:0", OrderingConfig::default())
            .unwrap();
        let client = Client::new(&node.url);
        let patient = Identity::new_patient().unwrap();
        let register = TxBody::RegisterPatient {
            public_key: patient.key.public_key(),
        };
        let registered = client.send(&patient, register.clone()).unwrap();
        assert!(matches!(registered.outcome, TxOutcome::Committed { .. }));

        // The nonce is read (2), then the patient's node, acting for them, commits nonce 2.
        let read_before = client.next_nonce(&patient.id).unwrap();
        assert_eq!(read_before, 2);
        let other = client.send(&patient, grant_body()).unwrap();
        assert!(matches!(other.outcome, TxOutcome::Committed { .. }));
        let calls = Cell::new(0);
        let answer = client
            .send_with_nonces(&patient, grant_body(), |client| {
                calls.set(calls.get() + 1);
                match calls.get() {
                    1 => Ok(read_before),
                    _ => client.next_nonce(&patient.id),
                }
            })
            .unwrap();
        assert!(
            matches!(answer.outcome, TxOutcome::Committed { .. }),
            "{:?}",
            answer.outcome
        );
        assert_eq!(calls.get(), 2);
        assert_eq!(client.next_nonce(&patient.id).unwrap(), 4);

        // A nonce that never becomes fresh: the refusal, after the bounded retries.
        calls.set(0);
        let answer = client
            .send_with_nonces(&patient, grant_body(), |_| {
                calls.set(calls.get() + 1);
                Ok(read_before)
            })
            .unwrap();
        assert!(stale(&answer), "{:?}", answer.outcome);
        assert_eq!(calls.get(), 1 + STALE_NONCE_RETRIES);

        // Registering twice is refused for what it is, and not sent again.
        calls.set(0);
        let answer = client
            .send_with_nonces(&patient, register, |client| {
                calls.set(calls.get() + 1);
                client.next_nonce(&patient.id)
            })
            .unwrap();
        assert!(
            matches!(answer.outcome, TxOutcome::Rejected { .. }) && !stale(&answer),
            "{:?}",
            answer.outcome
        );
        assert_eq!(calls.get(), 1);
    }
}
