//! A blocking client of a node's HTTP API, as the CLI and the demo use it.

use std::time::Duration;

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
    pub fn send(&self, identity: &Identity, body: TxBody) -> Result<SubmitResponse, ClientError> {
        let chain_id = self.chain_id()?;
        let nonce = self.next_nonce(&identity.id)?;
        let tx = identity.sign(&chain_id, nonce, now_ms() + TX_LIFETIME_MS, body);
        self.submit(&tx)
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
