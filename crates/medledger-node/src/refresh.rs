//! Refresh tokens: a person's login that was granted `offline_access` goes on without a new
//! password and one-time code until its session ends.
//!
//! A login starts a session (a family of refresh tokens). Each refresh token is used once:
//! redeeming it answers a new access token and the session's next refresh token (rotation).
//! Presenting an earlier token of the session again means someone else holds a copy, so the
//! whole session ends (reuse detection, as OAuth 2.0 Security BCP §4.14 advises for public
//! clients). A session lasts `SESSION_LIFETIME_S` from its login whatever the rotations, is
//! bound to the app (`client_id`) that logged in, and never grants more than it was given
//! at login or than the account may hold at the time of each refresh; a removed or locked
//! account refreshes nothing.
//!
//! A token is `<session id>.<generation>.<secret>`; the node keeps per session only the
//! SHA-256 of the current secret, its generation, the grant and the end, in a file readable
//! by its owner alone, rewritten atomically before any token it names is handed out. A
//! restart keeps the sessions, as `offline_access` promises.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::auth::{constant_time_eq, random_bytes, write_atomic, AuthError};

/// The file of a node's refresh sessions, in its data directory.
pub const SESSIONS_FILE: &str = "refresh-sessions.json";
/// How long a session lasts from its login, in seconds: 30 days.
pub const SESSION_LIFETIME_S: u64 = 30 * 24 * 60 * 60;
/// Most live sessions a node keeps; a login beyond that gets no refresh token.
pub const SESSIONS_MAX: usize = 20_000;

/// Why a refresh token was not redeemed; each is OAuth2's `invalid_grant` to the caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RefreshError {
    #[error("the refresh token is not one this server issued, or its session has ended")]
    Unknown,
    #[error("the refresh token's session has expired; log in again")]
    Expired,
    #[error("the refresh token was issued to another client")]
    WrongClient,
    #[error("the refresh token was already used; its session is ended for safety")]
    Reused,
    #[error("the sessions file could not be written: {0}")]
    Store(String),
}

/// What a session was granted at login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionGrant {
    pub username: String,
    /// The app that logged in (authorization code), or none (a password login).
    pub client_id: Option<String>,
    /// The scopes granted at login, canonical text.
    pub scope: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Session {
    grant: SessionGrant,
    generation: u64,
    /// SHA-256 of the current token's secret, hex.
    secret_hash: String,
    ends_at_s: u64,
}

/// A node's refresh sessions, kept in `SESSIONS_FILE`.
pub struct RefreshSessions {
    path: PathBuf,
    sessions: Mutex<BTreeMap<String, Session>>,
}

impl RefreshSessions {
    /// Opens the sessions file, or starts with none when there is no file yet.
    pub fn open(path: &Path) -> Result<RefreshSessions, AuthError> {
        let sessions = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AuthError::File {
                path: path.display().to_string(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(AuthError::File {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })
            }
        };
        Ok(RefreshSessions {
            path: path.to_path_buf(),
            sessions: Mutex::new(sessions),
        })
    }

    /// Starts a session for a login's grant; its first refresh token. None when the node
    /// already holds `SESSIONS_MAX` live sessions.
    pub fn start(&self, grant: SessionGrant, now_s: u64) -> Result<Option<String>, AuthError> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.retain(|_, session| session.ends_at_s > now_s);
        if sessions.len() >= SESSIONS_MAX {
            return Ok(None);
        }
        let id = URL_SAFE_NO_PAD.encode(random_bytes(16)?);
        let secret = URL_SAFE_NO_PAD.encode(random_bytes(32)?);
        let session = Session {
            grant,
            generation: 0,
            secret_hash: secret_hash(&secret),
            ends_at_s: now_s.saturating_add(SESSION_LIFETIME_S),
        };
        let token = format!("{id}.0.{secret}");
        let mut next = sessions.clone();
        next.insert(id, session);
        self.save(&next)?;
        *sessions = next;
        Ok(Some(token))
    }

    /// The grant of the session `token` is the current token of, presented by `client_id`.
    /// Nothing rotates: a refresh refused for another reason (a wider scope, a locked
    /// account) leaves the token good. An earlier token of the session ends it.
    pub fn check(
        &self,
        token: &str,
        client_id: Option<&str>,
        now_s: u64,
    ) -> Result<SessionGrant, RefreshError> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let id = self.current(&mut sessions, token, now_s)?;
        let grant = &sessions[&id].grant;
        if grant.client_id.as_deref() != client_id {
            return Err(RefreshError::WrongClient);
        }
        Ok(grant.clone())
    }

    /// Uses `token` up: the session's next token, which alone is good from now on.
    pub fn rotate(&self, token: &str, now_s: u64) -> Result<String, RefreshError> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let id = self.current(&mut sessions, token, now_s)?;
        let fresh = URL_SAFE_NO_PAD
            .encode(random_bytes(32).map_err(|e| RefreshError::Store(e.to_string()))?);
        let mut next = sessions.clone();
        let rotated = next.get_mut(&id).expect("the session is there");
        rotated.generation += 1;
        rotated.secret_hash = secret_hash(&fresh);
        let token = format!("{id}.{}.{fresh}", rotated.generation);
        self.save(&next)
            .map_err(|e| RefreshError::Store(e.to_string()))?;
        *sessions = next;
        Ok(token)
    }

    /// The id of the live session whose current token `token` is. An expired session, and
    /// one whose earlier token this is, are ended.
    fn current(
        &self,
        sessions: &mut BTreeMap<String, Session>,
        token: &str,
        now_s: u64,
    ) -> Result<String, RefreshError> {
        let mut parts = token.splitn(3, '.');
        let (Some(id), Some(generation), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(RefreshError::Unknown);
        };
        let generation: u64 = generation.parse().map_err(|_| RefreshError::Unknown)?;
        let session = sessions.get(id).ok_or(RefreshError::Unknown)?;
        let ended = if session.ends_at_s <= now_s {
            RefreshError::Expired
        } else if generation < session.generation {
            // An earlier token of this session: a copy is in other hands. Earlier secrets
            // are not kept, so whoever has seen a token of the session can end it this way,
            // and no one else can: the session id is in no other place.
            RefreshError::Reused
        } else if generation == session.generation
            && constant_time_eq(
                secret_hash(secret).as_bytes(),
                session.secret_hash.as_bytes(),
            )
        {
            return Ok(id.to_string());
        } else {
            return Err(RefreshError::Unknown);
        };
        let mut next = sessions.clone();
        next.remove(id);
        self.save(&next)
            .map_err(|e| RefreshError::Store(e.to_string()))?;
        *sessions = next;
        Err(ended)
    }

    /// Ends every session of `username` (an account that was removed).
    pub fn end_sessions_of(&self, username: &str) -> Result<usize, AuthError> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let mut next = sessions.clone();
        next.retain(|_, session| session.grant.username != username);
        let ended = sessions.len() - next.len();
        if ended > 0 {
            self.save(&next)?;
            *sessions = next;
        }
        Ok(ended)
    }

    fn save(&self, sessions: &BTreeMap<String, Session>) -> Result<(), AuthError> {
        let bytes = serde_json::to_vec(sessions).map_err(|e| AuthError::File {
            path: self.path.display().to_string(),
            detail: e.to_string(),
        })?;
        write_atomic(&self.path, &bytes)
    }
}

fn secret_hash(secret: &str) -> String {
    medledger_core::Hash::digest(secret.as_bytes()).to_hex()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole refresh: checked, then rotated.
    fn redeem(
        sessions: &RefreshSessions,
        token: &str,
        client: Option<&str>,
        now_s: u64,
    ) -> Result<(SessionGrant, String), RefreshError> {
        let grant = sessions.check(token, client, now_s)?;
        Ok((grant, sessions.rotate(token, now_s)?))
    }

    fn grant(client: Option<&str>) -> SessionGrant {
        SessionGrant {
            username: "dr-alice@hospital-a".into(),
            client_id: client.map(str::to_string),
            scope: "user/*.rs offline_access".into(),
        }
    }

    #[test]
    fn a_token_rotates_once_and_a_reused_one_ends_the_session() {
        // Goal: each redemption answers the grant and a new token; the old one is then
        // refused, and presenting it ends the session so the new one dies too; a token for
        // another client, a forged secret and an expired session are refused.
        let dir = tempfile::tempdir().expect("a directory");
        let path = dir.path().join(SESSIONS_FILE);
        let sessions = RefreshSessions::open(&path).expect("opens");
        let first = sessions
            .start(grant(Some("app")), 1_000)
            .expect("starts")
            .expect("a token");
        assert_eq!(
            redeem(&sessions, &first, None, 1_001).unwrap_err(),
            RefreshError::WrongClient
        );
        let (granted, second) = redeem(&sessions, &first, Some("app"), 1_002).expect("redeems");
        assert_eq!(granted, grant(Some("app")));
        assert_ne!(first, second);

        // Kept across a restart.
        let sessions = RefreshSessions::open(&path).expect("opens again");
        let forged = format!("{}x", &second[..second.len() - 1]);
        assert_eq!(
            redeem(&sessions, &forged, Some("app"), 1_003).unwrap_err(),
            RefreshError::Unknown
        );
        assert_eq!(
            redeem(&sessions, &first, Some("app"), 1_004).unwrap_err(),
            RefreshError::Reused
        );
        assert_eq!(
            redeem(&sessions, &second, Some("app"), 1_005).unwrap_err(),
            RefreshError::Unknown,
            "the reuse ended the session"
        );

        let late = sessions
            .start(grant(None), 2_000)
            .expect("starts")
            .expect("a token");
        assert_eq!(
            redeem(&sessions, &late, None, 2_000 + SESSION_LIFETIME_S).unwrap_err(),
            RefreshError::Expired
        );
        assert_eq!(
            redeem(&sessions, "not.a token", None, 2_001).unwrap_err(),
            RefreshError::Unknown
        );
    }

    #[test]
    fn ending_a_users_sessions_leaves_the_others() {
        // Goal: removing an account ends its sessions and no one else's.
        let dir = tempfile::tempdir().expect("a directory");
        let sessions = RefreshSessions::open(&dir.path().join(SESSIONS_FILE)).expect("opens");
        let alice = sessions
            .start(grant(None), 10)
            .expect("starts")
            .expect("a token");
        let bob = sessions
            .start(
                SessionGrant {
                    username: "dr-bob@hospital-a".into(),
                    ..grant(None)
                },
                10,
            )
            .expect("starts")
            .expect("a token");
        assert_eq!(
            sessions
                .end_sessions_of("dr-alice@hospital-a")
                .expect("ends"),
            1
        );
        assert_eq!(
            redeem(&sessions, &alice, None, 11).unwrap_err(),
            RefreshError::Unknown
        );
        assert!(redeem(&sessions, &bob, None, 11).is_ok());
    }
}
