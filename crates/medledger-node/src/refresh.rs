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
//! SHA-256 of the current secret, its generation, the grant and the end, one row per session
//! in an embedded redb file readable by its owner alone. Each change is one durable commit of
//! the rows it touches, made before any token it names is handed out, so its cost does not
//! grow with the number of sessions. A restart keeps the sessions, as `offline_access`
//! promises. The callers run these calls off the async threads: each may wait for an fsync.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::auth::{constant_time_eq, random_bytes, AuthError};

/// The file of a node's refresh sessions, in its data directory.
pub const SESSIONS_FILE: &str = "refresh.redb";
/// Where earlier versions kept the sessions (one JSON map, rewritten whole on each change):
/// moved into `SESSIONS_FILE` when the node opens it, then removed.
pub const LEGACY_SESSIONS_FILE: &str = "refresh-sessions.json";
/// Session id → the session, JSON.
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
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
    #[error("the sessions store could not be written: {0}")]
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

/// A node's refresh sessions, kept in `SESSIONS_FILE` and, for reading, in memory.
pub struct RefreshSessions {
    path: String,
    db: redb::Database,
    sessions: Mutex<BTreeMap<String, Session>>,
    /// Most live sessions: `SESSIONS_MAX`, smaller in tests.
    limit: usize,
}

impl RefreshSessions {
    /// Opens the sessions file (creating it, readable by the owner alone, when there is none)
    /// and moves in the sessions of a `LEGACY_SESSIONS_FILE` beside it.
    pub fn open(path: &Path) -> Result<RefreshSessions, AuthError> {
        RefreshSessions::open_with_limit(path, SESSIONS_MAX)
    }

    fn open_with_limit(path: &Path, limit: usize) -> Result<RefreshSessions, AuthError> {
        let error = |detail: String| AuthError::File {
            path: path.display().to_string(),
            detail,
        };
        create_owner_only(path).map_err(|e| error(e.to_string()))?;
        let db = redb::Database::create(path).map_err(|e| error(e.to_string()))?;
        let mut sessions = BTreeMap::new();
        let txn = db.begin_read().map_err(|e| error(e.to_string()))?;
        match txn.open_table(SESSIONS) {
            Ok(table) => {
                for row in table.iter().map_err(|e| error(e.to_string()))? {
                    let (id, session) = row.map_err(|e| error(e.to_string()))?;
                    let session: Session = serde_json::from_slice(session.value())
                        .map_err(|e| error(format!("session {}: {e}", id.value())))?;
                    sessions.insert(id.value().to_string(), session);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(error(e.to_string())),
        }
        drop(txn);
        let store = RefreshSessions {
            path: path.display().to_string(),
            db,
            sessions: Mutex::new(sessions),
            limit,
        };
        store.move_in_legacy(&path.with_file_name(LEGACY_SESSIONS_FILE))?;
        Ok(store)
    }

    /// Moves the sessions of an earlier version's JSON file in, then removes the file.
    fn move_in_legacy(&self, legacy: &Path) -> Result<(), AuthError> {
        let error = |detail: String| AuthError::File {
            path: legacy.display().to_string(),
            detail,
        };
        let bytes = match std::fs::read(legacy) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(error(e.to_string())),
        };
        let mut moved: BTreeMap<String, Session> =
            serde_json::from_slice(&bytes).map_err(|e| error(e.to_string()))?;
        let mut sessions = self.sessions.lock().expect("sessions lock");
        // A session already moved in (before a crash that kept the file) may have rotated
        // since; the file's copy of it is older.
        moved.retain(|id, _| !sessions.contains_key(id));
        let rows: Vec<(&str, &Session)> = moved.iter().map(|(id, s)| (id.as_str(), s)).collect();
        self.save(&rows, &[])?;
        sessions.extend(moved);
        std::fs::remove_file(legacy).map_err(|e| error(e.to_string()))
    }

    /// Starts a session for a login's grant; its first refresh token. None when the node
    /// already holds `SESSIONS_MAX` live sessions. Ended sessions are dropped here.
    pub fn start(&self, grant: SessionGrant, now_s: u64) -> Result<Option<String>, AuthError> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let ended: Vec<String> = sessions
            .iter()
            .filter(|(_, session)| session.ends_at_s <= now_s)
            .map(|(id, _)| id.clone())
            .collect();
        if sessions.len() - ended.len() >= self.limit {
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
        let ended_ids: Vec<&str> = ended.iter().map(String::as_str).collect();
        self.save(&[(&id, &session)], &ended_ids)?;
        for id in &ended {
            sessions.remove(id);
        }
        sessions.insert(id, session);
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
        let mut rotated = sessions[&id].clone();
        rotated.generation += 1;
        rotated.secret_hash = secret_hash(&fresh);
        let token = format!("{id}.{}.{fresh}", rotated.generation);
        self.save(&[(&id, &rotated)], &[])
            .map_err(|e| RefreshError::Store(e.to_string()))?;
        sessions.insert(id, rotated);
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
        self.save(&[], &[id])
            .map_err(|e| RefreshError::Store(e.to_string()))?;
        sessions.remove(id);
        Err(ended)
    }

    /// Ends every session of `username` (an account that was removed).
    pub fn end_sessions_of(&self, username: &str) -> Result<usize, AuthError> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let ended: Vec<String> = sessions
            .iter()
            .filter(|(_, session)| session.grant.username == username)
            .map(|(id, _)| id.clone())
            .collect();
        if !ended.is_empty() {
            let ids: Vec<&str> = ended.iter().map(String::as_str).collect();
            self.save(&[], &ids)?;
            for id in &ended {
                sessions.remove(id);
            }
        }
        Ok(ended.len())
    }

    /// Writes `put` and removes `remove` in one durable commit. The caller changes the
    /// sessions in memory only after it, holding their lock throughout.
    fn save(&self, put: &[(&str, &Session)], remove: &[&str]) -> Result<(), AuthError> {
        let error = |detail: String| AuthError::File {
            path: self.path.clone(),
            detail,
        };
        let txn = self.db.begin_write().map_err(|e| error(e.to_string()))?;
        {
            let mut table = txn.open_table(SESSIONS).map_err(|e| error(e.to_string()))?;
            for (id, session) in put {
                let bytes = serde_json::to_vec(session).map_err(|e| error(e.to_string()))?;
                table
                    .insert(*id, &bytes[..])
                    .map_err(|e| error(e.to_string()))?;
            }
            for id in remove {
                table.remove(*id).map_err(|e| error(e.to_string()))?;
            }
        }
        txn.commit().map_err(|e| error(e.to_string()))
    }
}

/// Creates `path` empty and readable by its owner alone unless it exists (redb then
/// initialises an empty file as a new database).
fn create_owner_only(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
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
        drop(sessions);
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
    fn a_full_store_starts_no_session_until_one_has_ended_and_keeps_what_it_holds() {
        // Goal: at the limit of live sessions a login gets no refresh token and nothing
        // changes; once a session has ended, a login starts one again and the ended one is
        // gone, also from the file; the file is readable by its owner alone.
        let dir = tempfile::tempdir().expect("a directory");
        let path = dir.path().join(SESSIONS_FILE);
        let sessions = RefreshSessions::open_with_limit(&path, 3).expect("opens");
        let first = sessions
            .start(grant(None), 10)
            .expect("starts")
            .expect("a token");
        for at in [20, 30] {
            sessions
                .start(grant(None), at)
                .expect("starts")
                .expect("a token");
        }
        assert_eq!(sessions.start(grant(None), 40).expect("no failure"), None);
        assert!(
            redeem(&sessions, &first, None, 41).is_ok(),
            "the first lives on"
        );

        let after_first_ends = 10 + SESSION_LIFETIME_S;
        let fourth = sessions
            .start(grant(None), after_first_ends)
            .expect("starts")
            .expect("a token once the first has ended");
        drop(sessions);
        let sessions = RefreshSessions::open_with_limit(&path, 3).expect("opens again");
        assert_eq!(
            sessions.sessions.lock().unwrap().len(),
            3,
            "the ended one is gone"
        );
        assert!(redeem(&sessions, &fourth, None, after_first_ends + 1).is_ok());
        assert_eq!(
            sessions
                .start(grant(None), after_first_ends + 2)
                .expect("no failure"),
            None
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)
                .expect("the file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn sessions_of_the_earlier_json_file_are_moved_in_once() {
        // Goal: a node upgraded from the JSON sessions file keeps every session in it (its
        // tokens redeem), removes the file, and a later copy of the file does not bring back
        // a token the session has rotated past.
        let dir = tempfile::tempdir().expect("a directory");
        let path = dir.path().join(SESSIONS_FILE);
        let legacy = dir.path().join(LEGACY_SESSIONS_FILE);
        let secret = "an-old-secret";
        let old = Session {
            grant: grant(None),
            generation: 2,
            secret_hash: secret_hash(secret),
            ends_at_s: 5_000,
        };
        let file = serde_json::to_vec(&BTreeMap::from([("old-id".to_string(), old)])).unwrap();
        std::fs::write(&legacy, &file).expect("writes");
        let sessions = RefreshSessions::open(&path).expect("opens");
        assert!(!legacy.exists(), "the file is removed once moved in");
        let (granted, next) =
            redeem(&sessions, &format!("old-id.2.{secret}"), None, 100).expect("redeems");
        assert_eq!(granted, grant(None));
        drop(sessions);

        std::fs::write(&legacy, &file).expect("writes again");
        let sessions = RefreshSessions::open(&path).expect("opens again");
        assert_eq!(
            redeem(&sessions, &format!("old-id.2.{secret}"), None, 101).unwrap_err(),
            RefreshError::Reused,
            "the stored session, not the file's older copy"
        );
        assert_eq!(
            redeem(&sessions, &next, None, 102).unwrap_err(),
            RefreshError::Unknown,
            "the reuse ended the session"
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
