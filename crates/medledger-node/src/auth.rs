//! Authentication and authorization for the FHIR API (SMART on FHIR).
//!
//! People log in with a password and a time-based one-time code (RFC 6238); backend
//! systems authenticate with a JWT signed by a key they enrolled (SMART Backend Services,
//! RFC 7523 client assertions). A registered SMART app (a public client) sends a person
//! here to log in and exchanges the one-time authorization code it gets back, with its
//! PKCE verifier (RFC 7636, S256 only), for the person's token. Either way the node answers with a short-lived access
//! token: a JWT signed ES256 by the node's own key, carrying SMART scopes that say which
//! FHIR interactions on which resource types the bearer may perform.
//!
//! Nothing here speaks HTTP and nothing reads the clock: callers pass the time in, so every
//! decision is reproducible and testable to the second.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use medledger_core::identity::{is_patient_pseudonym, split_user_id};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The shortest password an account may have, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Consecutive failed logins after which an account is locked.
pub const MAX_FAILED_LOGINS: u32 = 5;
/// How long a lock lasts.
pub const LOCKOUT_S: u64 = 60;
/// The TOTP time step (RFC 6238's default, and what authenticator apps assume).
pub const TOTP_STEP_S: u64 = 30;
/// Digits in a TOTP code.
pub const TOTP_DIGITS: u32 = 6;
/// Bytes of a TOTP secret: the HMAC-SHA-1 output size, as RFC 4226 recommends.
pub const TOTP_SECRET_BYTES: usize = 20;
/// The furthest ahead a client assertion's `exp` may be (SMART Backend Services).
pub const MAX_ASSERTION_LIFETIME_S: u64 = 300;
/// Default bound on remembered client assertion ids.
pub const JTI_CACHE_CAPACITY: usize = 100_000;

/// Longest scope text accepted. Scopes arrive from outside and are merged pairwise, so
/// the bound keeps parsing cheap whatever is sent.
const MAX_SCOPE_TEXT_BYTES: usize = 8192;
/// Longest FHIR resource type name accepted in a scope.
const MAX_RESOURCE_TYPE_CHARS: usize = 64;
/// Longest JWT accepted; real ones are well under 4 KiB.
const MAX_JWT_BYTES: usize = 16 * 1024;
/// Longest client assertion `jti` remembered.
const MAX_JTI_CHARS: usize = 256;
/// Unknown usernames whose failed attempts are counted in memory.
const MAX_UNKNOWN_TRACKED: usize = 10_000;
/// The JWT `typ` of access tokens (RFC 9068), so no other JWT this key may sign (an
/// OpenID Connect id_token, say) is ever taken for an access token.
const ACCESS_TOKEN_TYP: &str = "at+jwt";
/// Version of the accounts file layout.
const STORE_VERSION: u32 = 1;

/// An argon2id hash (default parameters) of a password nobody knows. A login for an
/// unknown username is checked against it, so it costs the same time as a login for a
/// real account and the answer time does not reveal which usernames exist.
const DUMMY_PASSWORD_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$5jrtNpBFRzNgT9X8D3GlVw$aEKNhe9fsfvWlcxGh0a5YM4P9e5gn7xSdyjMsxI8qNY";

/// Why an authentication or account operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("invalid scope: {0}")]
    InvalidScope(String),
    /// One answer for an unknown user, a wrong password and a wrong code, so a caller
    /// cannot learn which usernames exist or which factor was wrong.
    #[error("invalid username, password or code")]
    InvalidCredentials,
    #[error("too many failed logins; the account is locked for a while")]
    Locked,
    #[error("a password needs at least {MIN_PASSWORD_CHARS} characters")]
    PasswordTooShort,
    #[error("invalid username {0:?}: a practitioner is `name@org`, a patient a `pt-` pseudonym")]
    InvalidUsername(String),
    #[error("account {0} already exists")]
    DuplicateAccount(String),
    #[error("no account {0}")]
    UnknownAccount(String),
    #[error("client {0} already exists")]
    DuplicateClient(String),
    #[error("no client {0}")]
    UnknownClient(String),
    #[error("invalid client registration: {0}")]
    InvalidClient(String),
    #[error("client assertion refused: {0}")]
    ClientAssertion(#[from] AssertionError),
    #[error("invalid base32 text")]
    InvalidBase32,
    #[error("invalid token signing key: {0}")]
    InvalidKey(String),
    #[error("signing the access token failed")]
    Signing,
    #[error("the operating system's random number source failed")]
    Random,
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
}

// ---------------------------------------------------------------------------------------
// SMART scopes
// ---------------------------------------------------------------------------------------

/// Whose data a resource scope reaches: the patient in context, anything the user may
/// see, or (for backend clients) anything the system may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeContext {
    Patient,
    User,
    System,
}

impl ScopeContext {
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeContext::Patient => "patient",
            ScopeContext::User => "user",
            ScopeContext::System => "system",
        }
    }

    fn parse(text: &str) -> Option<ScopeContext> {
        match text {
            "patient" => Some(ScopeContext::Patient),
            "user" => Some(ScopeContext::User),
            "system" => Some(ScopeContext::System),
            _ => None,
        }
    }
}

/// A FHIR REST interaction a scope may permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interaction {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

/// The SMART v2 permission letters `c r u d s`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Permissions {
    pub create: bool,
    pub read: bool,
    pub update: bool,
    pub delete: bool,
    pub search: bool,
}

impl Permissions {
    pub const NONE: Permissions = Permissions {
        create: false,
        read: false,
        update: false,
        delete: false,
        search: false,
    };
    pub const ALL: Permissions = Permissions {
        create: true,
        read: true,
        update: true,
        delete: true,
        search: true,
    };
    /// SMART v1 `.read`.
    const V1_READ: Permissions = Permissions {
        read: true,
        search: true,
        ..Permissions::NONE
    };
    /// SMART v1 `.write`.
    const V1_WRITE: Permissions = Permissions {
        create: true,
        update: true,
        delete: true,
        ..Permissions::NONE
    };

    pub fn allows(self, interaction: Interaction) -> bool {
        match interaction {
            Interaction::Create => self.create,
            Interaction::Read => self.read,
            Interaction::Update => self.update,
            Interaction::Delete => self.delete,
            Interaction::Search => self.search,
        }
    }

    pub fn is_empty(self) -> bool {
        self == Permissions::NONE
    }

    pub fn union(self, other: Permissions) -> Permissions {
        Permissions {
            create: self.create || other.create,
            read: self.read || other.read,
            update: self.update || other.update,
            delete: self.delete || other.delete,
            search: self.search || other.search,
        }
    }

    pub fn intersection(self, other: Permissions) -> Permissions {
        Permissions {
            create: self.create && other.create,
            read: self.read && other.read,
            update: self.update && other.update,
            delete: self.delete && other.delete,
            search: self.search && other.search,
        }
    }

    /// True when every permission in `other` is also in `self`.
    pub fn contains(self, other: Permissions) -> bool {
        self.union(other) == self
    }

    fn flags(self) -> [(char, bool); 5] {
        [
            ('c', self.create),
            ('r', self.read),
            ('u', self.update),
            ('d', self.delete),
            ('s', self.search),
        ]
    }

    /// SMART v2 letters: a non-empty subsequence of `cruds`, so each letter appears at
    /// most once and in that order (the specification makes other spellings invalid,
    /// which keeps one canonical form per permission set).
    fn parse_letters(text: &str) -> Option<Permissions> {
        const ORDER: [char; 5] = ['c', 'r', 'u', 'd', 's'];
        if text.is_empty() {
            return None;
        }
        let mut next = 0;
        let mut seen = [false; 5];
        for letter in text.chars() {
            let position = ORDER.iter().position(|&c| c == letter)?;
            if position < next {
                return None;
            }
            seen[position] = true;
            next = position + 1;
        }
        Some(Permissions {
            create: seen[0],
            read: seen[1],
            update: seen[2],
            delete: seen[3],
            search: seen[4],
        })
    }
}

impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (letter, set) in self.flags() {
            if set {
                write!(f, "{letter}")?;
            }
        }
        Ok(())
    }
}

/// One resource scope such as `patient/Observation.rs`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SmartScope {
    pub context: ScopeContext,
    /// `None` stands for `*`, every resource type.
    pub resource_type: Option<String>,
    pub permissions: Permissions,
}

impl SmartScope {
    fn covers_type(&self, resource_type: &str) -> bool {
        match &self.resource_type {
            None => true,
            Some(own) => own == resource_type,
        }
    }

    fn parse(token: &str) -> Result<SmartScope, AuthError> {
        let invalid = |why: &str| AuthError::InvalidScope(format!("{token:?}: {why}"));
        if token.contains('?') {
            return Err(invalid(
                "scopes narrowed by a query (`?param=value`) are not supported",
            ));
        }
        let (context, rest) = token
            .split_once('/')
            .ok_or_else(|| invalid("unknown scope"))?;
        let context = ScopeContext::parse(context).ok_or_else(|| invalid("unknown scope"))?;
        let (resource, letters) = rest
            .split_once('.')
            .ok_or_else(|| invalid("expected <context>/<resource type>.<permissions>"))?;
        let resource_type = match resource {
            "*" => None,
            name if is_resource_type_name(name) => Some(name.to_string()),
            _ => return Err(invalid("not `*` or a FHIR resource type name")),
        };
        let permissions = match letters {
            "read" => Permissions::V1_READ,
            "write" => Permissions::V1_WRITE,
            "*" => Permissions::ALL,
            _ => Permissions::parse_letters(letters).ok_or_else(|| {
                invalid("permissions are `read`, `write`, `*`, or letters of `cruds` in that order, each once")
            })?,
        };
        Ok(SmartScope {
            context,
            resource_type,
            permissions,
        })
    }
}

impl fmt::Display for SmartScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}.{}",
            self.context.as_str(),
            self.resource_type.as_deref().unwrap_or("*"),
            self.permissions
        )
    }
}

/// FHIR resource type names are CamelCase ASCII words (`Observation`,
/// `MedicationRequest`).
fn is_resource_type_name(name: &str) -> bool {
    name.len() <= MAX_RESOURCE_TYPE_CHARS
        && name.as_bytes().first().is_some_and(u8::is_ascii_uppercase)
        && name.bytes().all(|b| b.is_ascii_alphabetic())
}

/// A parsed SMART scope string: resource scopes plus the few non-resource scopes the node
/// understands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes {
    pub resource: Vec<SmartScope>,
    pub openid: bool,
    pub fhir_user: bool,
    pub launch_patient: bool,
    pub offline_access: bool,
}

impl Scopes {
    /// Parses a space-separated scope string. SMART v1 permissions (`.read`, `.write`,
    /// `.*`) are read as their v2 equivalents; scopes naming the same context and type
    /// are merged.
    pub fn parse(text: &str) -> Result<Scopes, AuthError> {
        if text.len() > MAX_SCOPE_TEXT_BYTES {
            return Err(AuthError::InvalidScope(format!(
                "scope text longer than {MAX_SCOPE_TEXT_BYTES} bytes"
            )));
        }
        let mut scopes = Scopes::default();
        for token in text.split_ascii_whitespace() {
            match token {
                "openid" => scopes.openid = true,
                "fhirUser" => scopes.fhir_user = true,
                "launch/patient" => scopes.launch_patient = true,
                "offline_access" => scopes.offline_access = true,
                _ => scopes.add(SmartScope::parse(token)?),
            }
        }
        Ok(scopes)
    }

    /// Adds a resource scope, folding it into an existing one for the same context and
    /// type so the canonical form lists each pair once.
    fn add(&mut self, scope: SmartScope) {
        if scope.permissions.is_empty() {
            return;
        }
        match self.resource.iter_mut().find(|existing| {
            existing.context == scope.context && existing.resource_type == scope.resource_type
        }) {
            Some(existing) => existing.permissions = existing.permissions.union(scope.permissions),
            None => self.resource.push(scope),
        }
    }

    /// True when some resource scope is held (whatever the non-resource scopes).
    pub fn reaches_resources(&self) -> bool {
        !self.resource.is_empty()
    }

    /// True when no scope at all is held.
    pub fn is_empty(&self) -> bool {
        self.resource.is_empty()
            && !self.openid
            && !self.fhir_user
            && !self.launch_patient
            && !self.offline_access
    }

    /// Whether `interaction` on `resource_type` is permitted in `context`.
    pub fn allows(
        &self,
        context: ScopeContext,
        resource_type: &str,
        interaction: Interaction,
    ) -> bool {
        self.resource.iter().any(|scope| {
            scope.context == context
                && scope.covers_type(resource_type)
                && scope.permissions.allows(interaction)
        })
    }

    /// Whether `interaction` on `resource_type` is permitted in any context.
    pub fn allows_any(&self, resource_type: &str, interaction: Interaction) -> bool {
        [
            ScopeContext::Patient,
            ScopeContext::User,
            ScopeContext::System,
        ]
        .into_iter()
        .any(|context| self.allows(context, resource_type, interaction))
    }

    /// What may be granted when `self` is requested and `allowed` is the most the
    /// account or client may hold: every requested permission that some allowed scope of
    /// the same context covers. A request for `*` against type-specific allowances is
    /// narrowed to those types. The non-resource scopes are granted only when both ask
    /// for them, so an account's allowance must list `openid`, `fhirUser`,
    /// `launch/patient` or `offline_access` for a login to obtain them.
    pub fn intersect(&self, allowed: &Scopes) -> Scopes {
        let mut granted = Scopes {
            resource: Vec::new(),
            openid: self.openid && allowed.openid,
            fhir_user: self.fhir_user && allowed.fhir_user,
            launch_patient: self.launch_patient && allowed.launch_patient,
            offline_access: self.offline_access && allowed.offline_access,
        };
        for requested in &self.resource {
            let same_context = allowed
                .resource
                .iter()
                .filter(|scope| scope.context == requested.context);
            // Allowed scopes that reach every type the request names: `*` always does, a
            // named type only when the request names the same type.
            let covered = same_context
                .clone()
                .filter(|scope| {
                    scope.resource_type.is_none() || scope.resource_type == requested.resource_type
                })
                .fold(Permissions::NONE, |acc, scope| {
                    acc.union(scope.permissions.intersection(requested.permissions))
                });
            granted.add(SmartScope {
                context: requested.context,
                resource_type: requested.resource_type.clone(),
                permissions: covered,
            });
            if requested.resource_type.is_none() {
                for scope in same_context.filter(|scope| scope.resource_type.is_some()) {
                    let narrowed = scope.permissions.intersection(requested.permissions);
                    if !covered.contains(narrowed) {
                        granted.add(SmartScope {
                            context: requested.context,
                            resource_type: scope.resource_type.clone(),
                            permissions: narrowed,
                        });
                    }
                }
            }
        }
        granted
    }
}

impl fmt::Display for Scopes {
    /// The canonical SMART v2 form: resource scopes first, then the others.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self.resource.iter().map(ToString::to_string).collect();
        for (held, name) in [
            (self.openid, "openid"),
            (self.fhir_user, "fhirUser"),
            (self.launch_patient, "launch/patient"),
            (self.offline_access, "offline_access"),
        ] {
            if held {
                parts.push(name.to_string());
            }
        }
        f.write_str(&parts.join(" "))
    }
}

// ---------------------------------------------------------------------------------------
// Randomness, base32 and TOTP
// ---------------------------------------------------------------------------------------

pub(crate) fn random_bytes(count: usize) -> Result<Vec<u8>, AuthError> {
    let mut bytes = vec![0u8; count];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuthError::Random)?;
    Ok(bytes)
}

/// Compares two byte strings in time that depends only on their lengths, so a guess
/// that shares a prefix with the right answer is not answered faster or slower.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    difference == 0
}

/// A fresh TOTP secret from the operating system's random source.
pub fn new_totp_secret() -> Result<Vec<u8>, AuthError> {
    random_bytes(TOTP_SECRET_BYTES)
}

const BASE32_ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// RFC 4648 base32, uppercase, without padding: the form authenticator apps take.
pub fn base32_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let mut buffer: u16 = 0;
    let mut bits = 0;
    for &byte in bytes {
        buffer = (buffer << 8) | u16::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(
                BASE32_ALPHABET[usize::from((buffer >> bits) & 31)],
            ));
        }
    }
    if bits > 0 {
        out.push(char::from(
            BASE32_ALPHABET[usize::from((buffer << (5 - bits)) & 31)],
        ));
    }
    out
}

/// Decodes RFC 4648 base32. Lowercase and trailing `=` padding are accepted because
/// people copy secrets by hand; lengths no encoder produces and non-zero leftover bits
/// are refused so every secret has one spelling.
pub fn base32_decode(text: &str) -> Result<Vec<u8>, AuthError> {
    let text = text.trim_end_matches('=');
    if matches!(text.len() % 8, 1 | 3 | 6) {
        return Err(AuthError::InvalidBase32);
    }
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let mut buffer: u16 = 0;
    let mut bits = 0;
    for byte in text.bytes() {
        let value = match byte.to_ascii_uppercase() {
            upper @ b'A'..=b'Z' => upper - b'A',
            digit @ b'2'..=b'7' => digit - b'2' + 26,
            _ => return Err(AuthError::InvalidBase32),
        };
        buffer = (buffer << 5) | u16::from(value);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    if buffer & ((1 << bits) - 1) != 0 {
        return Err(AuthError::InvalidBase32);
    }
    Ok(out)
}

/// The 6-digit TOTP code (30 s steps, HMAC-SHA-1) for `secret` at `unix_seconds`.
pub fn totp_code(secret: &[u8], unix_seconds: u64) -> String {
    totp_lite::totp_custom::<totp_lite::Sha1>(TOTP_STEP_S, TOTP_DIGITS, secret, unix_seconds)
}

/// Checks a TOTP code at `now_s`, allowing one step of clock drift either way. Returns
/// the step the code belongs to, which the caller stores: a code for that step or any
/// earlier one is refused afterwards, so an overheard code cannot be used again.
pub fn verify_totp(secret: &[u8], code: &str, now_s: u64, last_used_step: u64) -> Option<u64> {
    let code = code.trim();
    if code.len() != TOTP_DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let current = now_s / TOTP_STEP_S;
    let mut matched = None;
    // Every candidate is computed and compared, whether or not an earlier one matched.
    for step in [
        current.checked_sub(1),
        Some(current),
        current.checked_add(1),
    ]
    .into_iter()
    .flatten()
    {
        let Some(at) = step.checked_mul(TOTP_STEP_S) else {
            continue;
        };
        let equal = constant_time_eq(totp_code(secret, at).as_bytes(), code.as_bytes());
        if equal && step > last_used_step {
            matched = Some(step);
        }
    }
    matched
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The `otpauth://` URI authenticator apps enrol from (usually shown as a QR code).
pub fn otpauth_uri(issuer: &str, account: &str, secret: &[u8]) -> String {
    let issuer = percent_encode(issuer);
    format!(
        "otpauth://totp/{issuer}:{}?secret={}&issuer={issuer}&algorithm=SHA1&digits={TOTP_DIGITS}&period={TOTP_STEP_S}",
        percent_encode(account),
        base32_encode(secret),
    )
}

// ---------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------

fn file_error(path: &Path) -> impl Fn(std::io::Error) -> AuthError + '_ {
    move |e| AuthError::File {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to a new owner-only temporary file beside `path` and flushes it to
/// disk. The temporary file is in the same directory so that moving it into place is a
/// rename within one filesystem, which is atomic.
fn write_temp_beside(path: &Path, bytes: &[u8]) -> Result<PathBuf, AuthError> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).map_err(file_error(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.tmp", hex::encode(random_bytes(8)?)));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&temp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    match written {
        Ok(()) => Ok(temp),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(file_error(&temp)(e))
        }
    }
}

/// Makes a rename in `dir` durable: the new directory entry is only on disk once the
/// directory itself is flushed.
fn sync_dir(dir: &Path) -> Result<(), AuthError> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(file_error(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new
/// content, never a mixture. The file is readable by its owner only.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AuthError> {
    let temp = write_temp_beside(path, bytes)?;
    if let Err(e) = std::fs::rename(&temp, path) {
        let _ = std::fs::remove_file(&temp);
        return Err(file_error(path)(e));
    }
    sync_dir(parent_dir(path))
}

/// Creates `path` with `bytes` unless it already exists. Returns false (and writes
/// nothing) if another process created it first, so two nodes starting at once settle on
/// one file.
fn create_atomic(path: &Path, bytes: &[u8]) -> Result<bool, AuthError> {
    let temp = write_temp_beside(path, bytes)?;
    // A hard link, unlike a rename, fails when the target exists.
    let linked = std::fs::hard_link(&temp, path);
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(()) => {
            sync_dir(parent_dir(path))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(file_error(path)(e)),
    }
}

// ---------------------------------------------------------------------------------------
// Accounts and clients
// ---------------------------------------------------------------------------------------

/// Who an account belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    Practitioner,
    Patient,
}

/// A person who logs in with a password and a TOTP code.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// A ledger user id `name@org`, or a patient pseudonym `pt-...`.
    pub username: String,
    pub kind: AccountKind,
    /// argon2id, PHC string form.
    pub password_hash: String,
    /// base32.
    pub totp_secret: String,
    /// The TOTP step of the last accepted code; that code and older ones are refused.
    pub last_totp_step: u64,
    /// The most a login may be granted.
    pub allowed_scopes: String,
    /// The key file the node signs this person's transactions with (opaque here).
    pub identity_file: String,
    pub failed_logins: u32,
    pub locked_until_s: u64,
}

// Written by hand so secrets never reach a log through `{:?}`.
impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("username", &self.username)
            .field("kind", &self.kind)
            .field("password_hash", &"<redacted>")
            .field("totp_secret", &"<redacted>")
            .field("last_totp_step", &self.last_totp_step)
            .field("allowed_scopes", &self.allowed_scopes)
            .field("identity_file", &self.identity_file)
            .field("failed_logins", &self.failed_logins)
            .field("locked_until_s", &self.locked_until_s)
            .finish()
    }
}

/// A SMART Backend Services client: a system that authenticates with a JWT signed by a
/// key it enrolled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Client {
    pub client_id: String,
    /// `{"keys":[...]}`: public JWKs (EC P-256 or P-384, or RSA of at least 2048 bits).
    pub jwks: Value,
    /// `system/...` scopes: the most a token for this client may carry.
    pub allowed_scopes: String,
    /// The ledger user id whose key signs for this client (opaque here).
    pub acts_as: String,
}

/// A SMART app registered for the standalone launch: a public client (a browser or
/// native app, which can keep no secret) that sends a person here to log in and gets a
/// one-time authorization code at one of its exact redirect URIs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub client_id: String,
    /// Compared exactly: `https://...`, or `http://` on the loopback host only.
    pub redirect_uris: Vec<String>,
    /// `patient/...` and `user/...` scopes (and `openid`, `fhirUser`, `launch/patient`):
    /// the most a token for this app may carry, whoever logs in.
    pub allowed_scopes: String,
}

#[derive(Serialize, Deserialize)]
struct StoreFile {
    version: u32,
    accounts: Vec<Account>,
    clients: Vec<Client>,
    /// Absent from files written before apps existed.
    #[serde(default)]
    apps: Vec<App>,
}

#[derive(Clone, Default)]
struct StoreState {
    accounts: BTreeMap<String, Account>,
    clients: BTreeMap<String, Client>,
    apps: BTreeMap<String, App>,
}

/// Largest redirect URI an app may register.
pub const MAX_REDIRECT_URI_BYTES: usize = 2048;
/// Most redirect URIs one app may register.
pub const MAX_REDIRECT_URIS: usize = 16;

fn check_client_id(id: &str) -> Result<(), AuthError> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::InvalidClient(format!(
            "client id {id:?} must be 1 to 128 printable ASCII characters"
        )));
    }
    Ok(())
}

/// Checks a redirect URI an app registers: absolute, `https`, or `http` only on the
/// loopback host (RFC 8252 §7.3), no user information and no fragment (RFC 6749
/// §3.1.2). The authority is limited to host name characters and a port, so its origin
/// can be named in the login page's Content-Security-Policy as it is.
pub fn check_redirect_uri(uri: &str) -> Result<(), String> {
    if uri.len() > MAX_REDIRECT_URI_BYTES || !uri.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "a redirect URI is at most {MAX_REDIRECT_URI_BYTES} printable ASCII characters"
        ));
    }
    if uri.contains('#') {
        return Err(format!("{uri}: a redirect URI has no fragment"));
    }
    let (rest, https) = if let Some(rest) = uri.strip_prefix("https://") {
        (rest, true)
    } else if let Some(rest) = uri.strip_prefix("http://") {
        (rest, false)
    } else {
        return Err(format!(
            "{uri}: a redirect URI is https (or http on loopback)"
        ));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_and_port_ok = !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !host_and_port_ok {
        return Err(format!(
            "{uri}: the host must be a plain host name or address, with an optional port"
        ));
    }
    if !https {
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.split(':').next().unwrap_or(""),
        };
        if !matches!(host, "127.0.0.1" | "localhost" | "::1") {
            return Err(format!(
                "{uri}: plain http is allowed only for 127.0.0.1, localhost or [::1]"
            ));
        }
    }
    Ok(())
}

/// The origin (`scheme://host[:port]`) of a checked redirect URI.
pub fn redirect_origin(uri: &str) -> &str {
    let scheme_end = uri.find("://").map_or(0, |i| i + 3);
    let authority_end = uri[scheme_end..]
        .find(['/', '?'])
        .map_or(uri.len(), |i| scheme_end + i);
    &uri[..authority_end]
}

/// Failed attempts against a username that has no account, counted like a real
/// account's so that a lock does not reveal which usernames exist.
#[derive(Clone, Copy, Default)]
struct Strikes {
    failures: u32,
    locked_until_s: u64,
}

/// Accounts and clients, kept in one JSON file that is replaced atomically on every
/// change.
pub struct AccountStore {
    path: PathBuf,
    state: Mutex<StoreState>,
    unknown: Mutex<HashMap<String, Strikes>>,
}

/// Takes a lock even if a thread panicked while holding it: the store only replaces its
/// state after the file is written, so what the mutex guards is always consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::encode_b64(&random_bytes(16)?).map_err(|_| AuthError::Random)?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|_| AuthError::Random)
}

fn password_matches(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

fn check_password_policy(password: &str) -> Result<(), AuthError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(AuthError::PasswordTooShort);
    }
    Ok(())
}

fn check_username(username: &str, kind: AccountKind) -> Result<(), AuthError> {
    let valid = match kind {
        AccountKind::Practitioner => split_user_id(username).is_some(),
        AccountKind::Patient => is_patient_pseudonym(username),
    };
    if valid {
        Ok(())
    } else {
        Err(AuthError::InvalidUsername(username.to_string()))
    }
}

/// Records one failed attempt; the attempt that reaches the limit starts the lock and
/// the count begins again once it ends.
fn add_failure(failures: &mut u32, locked_until_s: &mut u64, now_s: u64) {
    *failures = failures.saturating_add(1);
    if *failures >= MAX_FAILED_LOGINS {
        *failures = 0;
        *locked_until_s = now_s.saturating_add(LOCKOUT_S);
    }
}

impl AccountStore {
    /// Opens the store at `path`. A missing file is an empty store; the file is created
    /// on the first change.
    pub fn open(path: &Path) -> Result<AccountStore, AuthError> {
        let corrupt = |detail: String| AuthError::File {
            path: path.display().to_string(),
            detail,
        };
        let mut state = StoreState::default();
        match std::fs::read(path) {
            Ok(bytes) => {
                let file: StoreFile =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                if file.version != STORE_VERSION {
                    return Err(corrupt(format!(
                        "unsupported accounts file version {}",
                        file.version
                    )));
                }
                for account in file.accounts {
                    let name = account.username.clone();
                    if state.accounts.insert(name.clone(), account).is_some() {
                        return Err(corrupt(format!("account {name} appears twice")));
                    }
                }
                for client in file.clients {
                    let id = client.client_id.clone();
                    if state.clients.insert(id.clone(), client).is_some() {
                        return Err(corrupt(format!("client {id} appears twice")));
                    }
                }
                for app in file.apps {
                    let id = app.client_id.clone();
                    if state.clients.contains_key(&id)
                        || state.apps.insert(id.clone(), app).is_some()
                    {
                        return Err(corrupt(format!("client {id} appears twice")));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_error(path)(e)),
        }
        Ok(AccountStore {
            path: path.to_path_buf(),
            state: Mutex::new(state),
            unknown: Mutex::new(HashMap::new()),
        })
    }

    fn persist(&self, state: &StoreState) -> Result<(), AuthError> {
        let file = StoreFile {
            version: STORE_VERSION,
            accounts: state.accounts.values().cloned().collect(),
            clients: state.clients.values().cloned().collect(),
            apps: state.apps.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| AuthError::File {
            path: self.path.display().to_string(),
            detail: e.to_string(),
        })?;
        write_atomic(&self.path, &bytes)
    }

    /// Applies `change` to a copy of the state, writes it, and only then makes it the
    /// state, so memory never holds what the file does not.
    fn update<R>(
        &self,
        change: impl FnOnce(&mut StoreState) -> Result<R, AuthError>,
    ) -> Result<R, AuthError> {
        let mut state = lock(&self.state);
        let mut next = state.clone();
        let result = change(&mut next)?;
        self.persist(&next)?;
        *state = next;
        Ok(result)
    }

    /// Adds an account and returns its new TOTP secret, to be shown to the person once
    /// (see `otpauth_uri`).
    pub fn add_account(
        &self,
        username: &str,
        kind: AccountKind,
        password: &str,
        allowed_scopes: &str,
        identity_file: &str,
    ) -> Result<Vec<u8>, AuthError> {
        check_username(username, kind)?;
        check_password_policy(password)?;
        Scopes::parse(allowed_scopes)?;
        // Checked before hashing, which is slow, and again under the lock below.
        if self.account(username).is_some() {
            return Err(AuthError::DuplicateAccount(username.to_string()));
        }
        let password_hash = hash_password(password)?;
        let secret = new_totp_secret()?;
        let account = Account {
            username: username.to_string(),
            kind,
            password_hash,
            totp_secret: base32_encode(&secret),
            last_totp_step: 0,
            allowed_scopes: allowed_scopes.to_string(),
            identity_file: identity_file.to_string(),
            failed_logins: 0,
            locked_until_s: 0,
        };
        self.update(|state| {
            if state.accounts.contains_key(username) {
                return Err(AuthError::DuplicateAccount(username.to_string()));
            }
            state.accounts.insert(username.to_string(), account);
            Ok(())
        })?;
        Ok(secret)
    }

    /// Replaces an account's password. Failed-login counts and any lock are cleared: an
    /// administrator resetting the password has dealt with whatever caused them.
    pub fn set_password(&self, username: &str, password: &str) -> Result<(), AuthError> {
        check_password_policy(password)?;
        if self.account(username).is_none() {
            return Err(AuthError::UnknownAccount(username.to_string()));
        }
        let password_hash = hash_password(password)?;
        self.update(|state| {
            let account = state
                .accounts
                .get_mut(username)
                .ok_or_else(|| AuthError::UnknownAccount(username.to_string()))?;
            account.password_hash = password_hash;
            account.failed_logins = 0;
            account.locked_until_s = 0;
            Ok(())
        })
    }

    pub fn remove_account(&self, username: &str) -> Result<(), AuthError> {
        self.update(|state| {
            state
                .accounts
                .remove(username)
                .map(|_| ())
                .ok_or_else(|| AuthError::UnknownAccount(username.to_string()))
        })
    }

    /// Enrols a backend client after checking its keys, scopes and identity.
    pub fn add_client(&self, client: Client) -> Result<(), AuthError> {
        check_client_id(&client.client_id)?;
        parse_jwks(&client.jwks).map_err(AuthError::InvalidClient)?;
        let scopes = Scopes::parse(&client.allowed_scopes)?;
        if scopes.resource.is_empty()
            || scopes
                .resource
                .iter()
                .any(|scope| scope.context != ScopeContext::System)
            || scopes.openid
            || scopes.fhir_user
            || scopes.launch_patient
            || scopes.offline_access
        {
            return Err(AuthError::InvalidClient(
                "a backend client may only be allowed system/ scopes".to_string(),
            ));
        }
        if split_user_id(&client.acts_as).is_none() {
            return Err(AuthError::InvalidClient(format!(
                "acts_as {:?} is not a ledger user id `name@org`",
                client.acts_as
            )));
        }
        self.update(|state| {
            if state.clients.contains_key(&client.client_id)
                || state.apps.contains_key(&client.client_id)
            {
                return Err(AuthError::DuplicateClient(client.client_id.clone()));
            }
            state.clients.insert(client.client_id.clone(), client);
            Ok(())
        })
    }

    /// Registers a SMART app (a public client) after checking its id, redirect URIs and
    /// scopes. Client ids are one namespace: an app may not share a backend client's id.
    pub fn add_app(&self, app: App) -> Result<(), AuthError> {
        check_client_id(&app.client_id)?;
        if app.redirect_uris.is_empty() || app.redirect_uris.len() > MAX_REDIRECT_URIS {
            return Err(AuthError::InvalidClient(format!(
                "an app registers 1 to {MAX_REDIRECT_URIS} redirect URIs"
            )));
        }
        for uri in &app.redirect_uris {
            check_redirect_uri(uri).map_err(AuthError::InvalidClient)?;
        }
        let scopes = Scopes::parse(&app.allowed_scopes)?;
        if scopes.resource.is_empty()
            || scopes
                .resource
                .iter()
                .any(|scope| scope.context == ScopeContext::System)
        {
            return Err(AuthError::InvalidClient(
                "an app is allowed patient/ or user/ scopes, never system/".to_string(),
            ));
        }
        self.update(|state| {
            if state.clients.contains_key(&app.client_id) || state.apps.contains_key(&app.client_id)
            {
                return Err(AuthError::DuplicateClient(app.client_id.clone()));
            }
            state.apps.insert(app.client_id.clone(), app);
            Ok(())
        })
    }

    pub fn remove_app(&self, client_id: &str) -> Result<(), AuthError> {
        self.update(|state| {
            state
                .apps
                .remove(client_id)
                .map(|_| ())
                .ok_or_else(|| AuthError::UnknownClient(client_id.to_string()))
        })
    }

    pub fn app(&self, client_id: &str) -> Option<App> {
        lock(&self.state).apps.get(client_id).cloned()
    }

    pub fn remove_client(&self, client_id: &str) -> Result<(), AuthError> {
        self.update(|state| {
            state
                .clients
                .remove(client_id)
                .map(|_| ())
                .ok_or_else(|| AuthError::UnknownClient(client_id.to_string()))
        })
    }

    pub fn account(&self, username: &str) -> Option<Account> {
        lock(&self.state).accounts.get(username).cloned()
    }

    pub fn client(&self, client_id: &str) -> Option<Client> {
        lock(&self.state).clients.get(client_id).cloned()
    }

    /// Checks a password and TOTP code. On success the code's step is stored (so the
    /// code cannot be used again) and the failure count cleared; after
    /// `MAX_FAILED_LOGINS` consecutive failures the account is locked for `LOCKOUT_S`.
    pub fn login(
        &self,
        username: &str,
        password: &str,
        totp: &str,
        now_s: u64,
    ) -> Result<Account, AuthError> {
        // The password is checked outside the lock (argon2 takes a while, and other
        // logins should not queue behind it); the code, counters and lock are checked
        // and changed under it, so two logins racing with one code cannot both succeed.
        let Some(snapshot) = self.account(username) else {
            return self.fail_unknown_user(username, password, now_s);
        };
        if snapshot.locked_until_s > now_s {
            return Err(AuthError::Locked);
        }
        let password_ok = password_matches(&snapshot.password_hash, password);

        let mut state = lock(&self.state);
        let Some(current) = state.accounts.get(username) else {
            return Err(AuthError::InvalidCredentials);
        };
        if current.locked_until_s > now_s {
            return Err(AuthError::Locked);
        }
        // A password changed meanwhile was checked against the old hash; do not trust it.
        let password_ok = password_ok && current.password_hash == snapshot.password_hash;
        let step = base32_decode(&current.totp_secret)
            .ok()
            .and_then(|secret| verify_totp(&secret, totp, now_s, current.last_totp_step));
        let mut updated = current.clone();
        let outcome = match (password_ok, step) {
            (true, Some(step)) => {
                updated.last_totp_step = step;
                updated.failed_logins = 0;
                updated.locked_until_s = 0;
                Ok(())
            }
            _ => {
                add_failure(
                    &mut updated.failed_logins,
                    &mut updated.locked_until_s,
                    now_s,
                );
                Err(AuthError::InvalidCredentials)
            }
        };
        let mut next = state.clone();
        next.accounts.insert(username.to_string(), updated.clone());
        self.persist(&next)?;
        *state = next;
        outcome.map(|()| updated)
    }

    /// The failure path for a username without an account, made to look like a real
    /// account's: the same argon2 work, the same file write, the same lockout.
    fn fail_unknown_user(
        &self,
        username: &str,
        password: &str,
        now_s: u64,
    ) -> Result<Account, AuthError> {
        {
            let mut unknown = lock(&self.unknown);
            if unknown
                .get(username)
                .is_some_and(|strikes| strikes.locked_until_s > now_s)
            {
                return Err(AuthError::Locked);
            }
            if unknown.len() >= MAX_UNKNOWN_TRACKED && !unknown.contains_key(username) {
                unknown.retain(|_, strikes| strikes.locked_until_s > now_s);
            }
        }
        let _ = password_matches(DUMMY_PASSWORD_HASH, password);
        {
            let mut unknown = lock(&self.unknown);
            if unknown.len() < MAX_UNKNOWN_TRACKED || unknown.contains_key(username) {
                let strikes = unknown.entry(username.to_string()).or_default();
                add_failure(&mut strikes.failures, &mut strikes.locked_until_s, now_s);
            }
        }
        // Rewrite the unchanged file: a failure against a real account writes its
        // counter, and the time that write takes must not tell the two cases apart.
        let state = lock(&self.state);
        self.persist(&state)?;
        Err(AuthError::InvalidCredentials)
    }
}

// ---------------------------------------------------------------------------------------
// Reading JWTs
// ---------------------------------------------------------------------------------------

/// Decodes one base64url JWT segment into a JSON object.
fn decode_segment(segment: &str) -> Option<serde_json::Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// Splits a compact JWS into its three segments.
fn split_jws(token: &str) -> Option<[&str; 3]> {
    if token.len() > MAX_JWT_BYTES {
        return None;
    }
    let mut parts = token.split('.');
    let segments = [parts.next()?, parts.next()?, parts.next()?];
    parts.next().is_none().then_some(segments)
}

/// The JOSE header, read before any key is chosen so the algorithm can be refused with
/// a precise error (`jsonwebtoken` cannot even parse `"alg":"none"`). A `crit` header
/// names extensions the signer requires the reader to understand; none are, so such
/// tokens are refused (RFC 7515 section 4.1.11).
fn read_header(token: &str) -> Option<serde_json::Map<String, Value>> {
    let [header, _, _] = split_jws(token)?;
    let header = decode_segment(header)?;
    (!header.contains_key("crit")).then_some(header)
}

/// Signature checks only: every claim is checked by the callers against the time they
/// pass in, never against the system clock.
fn signature_only(alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    validation.leeway = 0;
    validation
}

fn optional_u64(claims: &Value, name: &str) -> Result<Option<u64>, ()> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or(()),
    }
}

// ---------------------------------------------------------------------------------------
// Access tokens
// ---------------------------------------------------------------------------------------

/// The node's access-token signing key (ECDSA P-256).
pub struct TokenKeys {
    pkcs8: Vec<u8>,
    public_point: Vec<u8>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    kid: String,
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKeys").field("kid", &self.kid).finish()
    }
}

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

impl TokenKeys {
    pub fn generate() -> Result<TokenKeys, AuthError> {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| AuthError::Random)?;
        TokenKeys::from_pkcs8_der(pkcs8.as_ref())
    }

    pub fn from_pkcs8_der(der: &[u8]) -> Result<TokenKeys, AuthError> {
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
                .map_err(|e| AuthError::InvalidKey(format!("not a PKCS#8 P-256 key: {e}")))?;
        let public_point = pair.public_key().as_ref().to_vec();
        let digest = ring::digest::digest(&ring::digest::SHA256, &public_point);
        Ok(TokenKeys {
            pkcs8: der.to_vec(),
            encoding: EncodingKey::from_ec_der(der),
            decoding: DecodingKey::from_ec_der(&public_point),
            kid: URL_SAFE_NO_PAD.encode(&digest.as_ref()[..16]),
            public_point,
        })
    }

    pub fn from_pkcs8_pem(pem: &str) -> Result<TokenKeys, AuthError> {
        let bad = || AuthError::InvalidKey("expected a PEM `PRIVATE KEY` block".to_string());
        let start = pem.find(PEM_BEGIN).ok_or_else(bad)? + PEM_BEGIN.len();
        let end = start + pem[start..].find(PEM_END).ok_or_else(bad)?;
        let body: String = pem[start..end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let der = STANDARD.decode(body).map_err(|_| bad())?;
        TokenKeys::from_pkcs8_der(&der)
    }

    pub fn to_pkcs8_pem(&self) -> String {
        let body = STANDARD.encode(&self.pkcs8);
        let mut pem = format!("{PEM_BEGIN}\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str(PEM_END);
        pem.push('\n');
        pem
    }

    /// Loads the key at `path`, or creates it (owner-only, atomically) if there is none.
    pub fn load_or_create(path: &Path) -> Result<TokenKeys, AuthError> {
        match std::fs::read_to_string(path) {
            Ok(pem) => return TokenKeys::from_pkcs8_pem(&pem),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_error(path)(e)),
        }
        let keys = TokenKeys::generate()?;
        if create_atomic(path, keys.to_pkcs8_pem().as_bytes())? {
            Ok(keys)
        } else {
            let pem = std::fs::read_to_string(path).map_err(file_error(path))?;
            TokenKeys::from_pkcs8_pem(&pem)
        }
    }

    /// base64url of the first 16 bytes of SHA-256 over the public point.
    pub fn kid(&self) -> String {
        self.kid.clone()
    }

    /// The public key as a JWK set, for resource servers that check tokens themselves.
    pub fn jwks(&self) -> Value {
        serde_json::json!({
            "keys": [{
                "kty": "EC",
                "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(&self.public_point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&self.public_point[33..65]),
                "kid": self.kid,
                "alg": "ES256",
                "use": "sig",
            }]
        })
    }
}

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    pub jti: String,
    pub scope: String,
    #[serde(rename = "fhirUser", default, skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// How the subject authenticated, e.g. `["pwd","otp"]` or `["private_key_jwt"]`.
    #[serde(default)]
    pub amr: Vec<String>,
}

/// What an ID token says about a login, besides issuer and times.
pub struct IdTokenClaims<'a> {
    pub sub: &'a str,
    /// The app the token is for: its audience.
    pub client_id: &'a str,
    pub nonce: Option<&'a str>,
    /// Given when the `fhirUser` scope was granted.
    pub fhir_user: Option<&'a str>,
    /// How the person logged in: the access token's `amr`.
    pub amr: &'a [String],
}

#[derive(Serialize)]
struct IdToken<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
    #[serde(rename = "fhirUser", skip_serializing_if = "Option::is_none")]
    fhir_user: Option<&'a str>,
    amr: &'a [String],
}

/// Why an access token was refused. The HTTP layer answers all of them with 401
/// `invalid_token`; `code` is for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a well-formed access token")]
    Malformed,
    #[error("the token's signing algorithm is not allowed")]
    AlgorithmNotAllowed,
    #[error("the token's signature is not by this node's key")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is for another audience")]
    WrongAudience,
    #[error("the token is from another issuer")]
    WrongIssuer,
    #[error("the token's scope is invalid")]
    InvalidScope,
}

impl TokenError {
    pub fn code(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::AlgorithmNotAllowed => "algorithm_not_allowed",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongAudience => "wrong_audience",
            TokenError::WrongIssuer => "wrong_issuer",
            TokenError::InvalidScope => "invalid_scope",
        }
    }
}

/// Signs and checks the node's access tokens.
#[derive(Debug)]
pub struct TokenIssuer {
    keys: TokenKeys,
    issuer: String,
    audience: String,
    lifetime_s: u64,
}

impl TokenIssuer {
    /// `issuer` is the node's authorization server URL, `audience` the FHIR base URL the
    /// tokens are for.
    pub fn new(
        keys: TokenKeys,
        issuer: impl Into<String>,
        audience: impl Into<String>,
        lifetime_s: u64,
    ) -> TokenIssuer {
        TokenIssuer {
            keys,
            issuer: issuer.into(),
            audience: audience.into(),
            lifetime_s,
        }
    }

    pub fn keys(&self) -> &TokenKeys {
        &self.keys
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    pub fn lifetime_s(&self) -> u64 {
        self.lifetime_s
    }

    /// Signs an access token valid from `now_s` for the issuer's lifetime.
    // The arguments are the token's independent claims; a struct to carry them would
    // only restate `Claims`.
    #[allow(clippy::too_many_arguments)]
    pub fn issue(
        &self,
        sub: &str,
        scopes: &Scopes,
        patient: Option<&str>,
        fhir_user: Option<&str>,
        client_id: Option<&str>,
        amr: &[&str],
        now_s: u64,
    ) -> Result<(String, Claims), AuthError> {
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: sub.to_string(),
            exp: now_s.saturating_add(self.lifetime_s),
            iat: now_s,
            jti: URL_SAFE_NO_PAD.encode(random_bytes(16)?),
            scope: scopes.to_string(),
            fhir_user: fhir_user.map(str::to_string),
            patient: patient.map(str::to_string),
            client_id: client_id.map(str::to_string),
            amr: amr.iter().map(|method| method.to_string()).collect(),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some(ACCESS_TOKEN_TYP.to_string());
        header.kid = Some(self.keys.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.keys.encoding)
            .map_err(|_| AuthError::Signing)?;
        Ok((token, claims))
    }

    /// Signs an OpenID Connect ID token for `client_id` about `sub`, valid as long as an
    /// access token. Its type is `JWT`, not an access token's, and its audience the app,
    /// so `verify` refuses it as a bearer token.
    pub fn issue_id_token(
        &self,
        claims: IdTokenClaims<'_>,
        now_s: u64,
    ) -> Result<String, AuthError> {
        let body = IdToken {
            iss: &self.issuer,
            sub: claims.sub,
            aud: claims.client_id,
            exp: now_s.saturating_add(self.lifetime_s),
            iat: now_s,
            nonce: claims.nonce,
            fhir_user: claims.fhir_user,
            amr: claims.amr,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("JWT".to_string());
        header.kid = Some(self.keys.kid.clone());
        jsonwebtoken::encode(&header, &body, &self.keys.encoding).map_err(|_| AuthError::Signing)
    }

    /// Checks an access token: ES256 under this node's key, this issuer and audience,
    /// unexpired at `now_s`, and a scope that parses.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Claims, TokenError> {
        let header = read_header(token).ok_or(TokenError::Malformed)?;
        match header.get("alg").and_then(Value::as_str) {
            Some("ES256") => {}
            Some(_) => return Err(TokenError::AlgorithmNotAllowed),
            None => return Err(TokenError::Malformed),
        }
        if header.get("typ").and_then(Value::as_str) != Some(ACCESS_TOKEN_TYP) {
            return Err(TokenError::Malformed);
        }
        match header.get("kid") {
            None => {}
            Some(Value::String(kid)) if *kid == self.keys.kid => {}
            Some(Value::String(_)) => return Err(TokenError::BadSignature),
            Some(_) => return Err(TokenError::Malformed),
        }
        let data = jsonwebtoken::decode::<Value>(
            token,
            &self.keys.decoding,
            &signature_only(Algorithm::ES256),
        )
        .map_err(|e| match e.kind() {
            JwtErrorKind::InvalidSignature
            | JwtErrorKind::InvalidEcdsaKey
            | JwtErrorKind::Crypto(_) => TokenError::BadSignature,
            JwtErrorKind::InvalidAlgorithm => TokenError::AlgorithmNotAllowed,
            _ => TokenError::Malformed,
        })?;
        let nbf = optional_u64(&data.claims, "nbf").map_err(|()| TokenError::Malformed)?;
        let claims: Claims =
            serde_json::from_value(data.claims).map_err(|_| TokenError::Malformed)?;
        if claims.iss != self.issuer {
            return Err(TokenError::WrongIssuer);
        }
        if claims.aud != self.audience {
            return Err(TokenError::WrongAudience);
        }
        if claims.exp <= now_s {
            return Err(TokenError::Expired);
        }
        if claims.iat > now_s || nbf.is_some_and(|nbf| nbf > now_s) {
            return Err(TokenError::NotYetValid);
        }
        Scopes::parse(&claims.scope).map_err(|_| TokenError::InvalidScope)?;
        Ok(claims)
    }
}

// ---------------------------------------------------------------------------------------
// Client assertions (SMART Backend Services)
// ---------------------------------------------------------------------------------------

/// Why a client assertion was refused. The token endpoint answers all of them with
/// `invalid_client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum AssertionError {
    #[error("the assertion is not a well-formed JWT")]
    Malformed,
    #[error("the assertion's algorithm is not ES384, RS384 or ES256")]
    AlgorithmNotAllowed,
    #[error("no such client")]
    UnknownClient,
    #[error("no enrolled key of the client fits the assertion")]
    UnknownKey,
    #[error("the assertion's signature does not verify")]
    BadSignature,
    #[error("the assertion's iss and sub must both be the client id")]
    IssuerSubjectMismatch,
    #[error("the assertion is for another token endpoint")]
    WrongAudience,
    #[error("the assertion has no exp")]
    MissingExpiry,
    #[error("the assertion has expired")]
    Expired,
    #[error("the assertion expires too far ahead")]
    LifetimeTooLong,
    #[error("the assertion is not valid yet")]
    NotYetValid,
    #[error("the assertion has no usable jti")]
    MissingJti,
    #[error("the assertion was already used")]
    Replayed,
    #[error("too many assertions to remember; try again shortly")]
    ReplayCacheFull,
}

/// Client assertion ids seen and not yet expired, so each assertion is used once.
#[derive(Debug)]
pub struct JtiCache {
    seen: Mutex<HashMap<(String, String), u64>>,
    capacity: usize,
}

impl Default for JtiCache {
    fn default() -> Self {
        JtiCache::new()
    }
}

impl JtiCache {
    pub fn new() -> JtiCache {
        JtiCache::with_capacity(JTI_CACHE_CAPACITY)
    }

    pub fn with_capacity(capacity: usize) -> JtiCache {
        JtiCache {
            seen: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.seen).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remembers `jti` of `client_id` until `exp`, refusing one already remembered. Ids
    /// are kept per client, so two clients choosing the same id do not collide. When
    /// full, expired ids are forgotten (their assertions are refused as expired anyway);
    /// if that frees nothing the assertion is refused rather than the id forgotten,
    /// since forgetting would allow a replay.
    fn remember(
        &self,
        client_id: &str,
        jti: &str,
        exp: u64,
        now_s: u64,
    ) -> Result<(), AssertionError> {
        let mut seen = lock(&self.seen);
        let key = (client_id.to_string(), jti.to_string());
        if seen.get(&key).is_some_and(|&until| until > now_s) {
            return Err(AssertionError::Replayed);
        }
        if seen.len() >= self.capacity && !seen.contains_key(&key) {
            seen.retain(|_, until| *until > now_s);
            if seen.len() >= self.capacity {
                return Err(AssertionError::ReplayCacheFull);
            }
        }
        seen.insert(key, exp);
        Ok(())
    }
}

/// JWK members that only private or symmetric keys have.
const SECRET_JWK_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "k"];

/// Reads and checks an enrolled key set: public EC P-256/P-384 or RSA (2048 bits or
/// more) keys only, with distinct key ids.
fn parse_jwks(jwks: &Value) -> Result<Vec<Jwk>, String> {
    let keys = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("jwks must be an object with a `keys` array")?;
    if keys.is_empty() || keys.len() > 16 {
        return Err("jwks must hold 1 to 16 keys".to_string());
    }
    let mut parsed: Vec<Jwk> = Vec::with_capacity(keys.len());
    for raw in keys {
        let object = raw.as_object().ok_or("each key must be a JSON object")?;
        if let Some(member) = SECRET_JWK_MEMBERS.iter().find(|m| object.contains_key(**m)) {
            return Err(format!(
                "a key holds private or secret material (`{member}`); enrol public keys only"
            ));
        }
        let jwk: Jwk =
            serde_json::from_value(raw.clone()).map_err(|e| format!("unreadable JWK: {e}"))?;
        match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(params) => {
                let size = match params.curve {
                    EllipticCurve::P256 => 32,
                    EllipticCurve::P384 => 48,
                    _ => return Err("EC keys must be on P-256 or P-384".to_string()),
                };
                let x = URL_SAFE_NO_PAD
                    .decode(&params.x)
                    .map_err(|e| e.to_string())?;
                let y = URL_SAFE_NO_PAD
                    .decode(&params.y)
                    .map_err(|e| e.to_string())?;
                if x.len() != size || y.len() != size {
                    return Err("EC key coordinates have the wrong length".to_string());
                }
            }
            AlgorithmParameters::RSA(params) => {
                let n = URL_SAFE_NO_PAD
                    .decode(&params.n)
                    .map_err(|e| e.to_string())?;
                let e = URL_SAFE_NO_PAD
                    .decode(&params.e)
                    .map_err(|e| e.to_string())?;
                let significant = n.iter().skip_while(|&&b| b == 0).count();
                if significant < 256 || e.is_empty() {
                    return Err("RSA keys must have at least 2048 bits".to_string());
                }
            }
            _ => return Err("keys must be EC (P-256, P-384) or RSA".to_string()),
        }
        if let Some(kid) = &jwk.common.key_id {
            if parsed
                .iter()
                .any(|other| other.common.key_id.as_ref() == Some(kid))
            {
                return Err(format!("key id {kid:?} appears twice"));
            }
        }
        parsed.push(jwk);
    }
    Ok(parsed)
}

/// Whether an enrolled key may check a signature made with `alg`: the key type and
/// curve must be the ones the algorithm uses, and a key that names its algorithm or
/// use must name this one and signing.
fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    let shape = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        (AlgorithmParameters::RSA(_), Algorithm::RS384) => true,
        _ => false,
    };
    let declared = match jwk.common.key_algorithm {
        None => true,
        Some(KeyAlgorithm::ES256) => alg == Algorithm::ES256,
        Some(KeyAlgorithm::ES384) => alg == Algorithm::ES384,
        Some(KeyAlgorithm::RS384) => alg == Algorithm::RS384,
        Some(_) => false,
    };
    let usage = matches!(
        jwk.common.public_key_use,
        None | Some(PublicKeyUse::Signature)
    );
    shape && declared && usage
}

/// Checks a SMART Backend Services client assertion (RFC 7523 `private_key_jwt`) and
/// returns the client it authenticates.
pub fn verify_client_assertion(
    store: &AccountStore,
    assertion: &str,
    token_url: &str,
    now_s: u64,
    seen: &JtiCache,
) -> Result<Client, AuthError> {
    use AssertionError as E;
    let header = read_header(assertion).ok_or(E::Malformed)?;
    let alg = match header.get("alg").and_then(Value::as_str) {
        Some("ES384") => Algorithm::ES384,
        Some("RS384") => Algorithm::RS384,
        Some("ES256") => Algorithm::ES256,
        Some(_) => return Err(E::AlgorithmNotAllowed.into()),
        None => return Err(E::Malformed.into()),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.as_str()),
        Some(_) => return Err(E::Malformed.into()),
    };

    // The client is named by the unverified claims; nothing else in them is trusted
    // until the signature under that client's key has been checked.
    let [_, payload, _] = split_jws(assertion).ok_or(E::Malformed)?;
    let unverified = decode_segment(payload).ok_or(E::Malformed)?;
    let claimed_id = unverified
        .get("iss")
        .and_then(Value::as_str)
        .ok_or(E::Malformed)?;
    let client = store.client(claimed_id).ok_or(E::UnknownClient)?;

    let keys = parse_jwks(&client.jwks).map_err(|_| E::UnknownKey)?;
    let candidates: Vec<&Jwk> = keys
        .iter()
        .filter(|jwk| kid.is_none_or(|kid| jwk.common.key_id.as_deref() == Some(kid)))
        .filter(|jwk| key_fits(jwk, alg))
        .collect();
    if candidates.is_empty() {
        return Err(E::UnknownKey.into());
    }
    let validation = signature_only(alg);
    let mut verified = None;
    for jwk in candidates {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match jsonwebtoken::decode::<Value>(assertion, &key, &validation) {
            Ok(data) => {
                verified = Some(data.claims);
                break;
            }
            Err(e) => match e.kind() {
                JwtErrorKind::InvalidSignature
                | JwtErrorKind::InvalidEcdsaKey
                | JwtErrorKind::InvalidRsaKey(_)
                | JwtErrorKind::Crypto(_) => continue,
                _ => return Err(E::Malformed.into()),
            },
        }
    }
    let claims = verified.ok_or(E::BadSignature)?;

    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    if text("iss") != Some(client.client_id.as_str())
        || text("sub") != Some(client.client_id.as_str())
    {
        return Err(E::IssuerSubjectMismatch.into());
    }
    // RFC 7519 lets `aud` be one string or a list; either way the token URL must be it.
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => aud == token_url,
        Some(Value::Array(list)) => list.iter().any(|aud| aud.as_str() == Some(token_url)),
        _ => false,
    };
    if !audience_ok {
        return Err(E::WrongAudience.into());
    }
    let exp = optional_u64(&claims, "exp")
        .map_err(|()| E::Malformed)?
        .ok_or(E::MissingExpiry)?;
    if exp <= now_s {
        return Err(E::Expired.into());
    }
    if exp > now_s.saturating_add(MAX_ASSERTION_LIFETIME_S) {
        return Err(E::LifetimeTooLong.into());
    }
    if optional_u64(&claims, "nbf")
        .map_err(|()| E::Malformed)?
        .is_some_and(|nbf| nbf > now_s)
    {
        return Err(E::NotYetValid.into());
    }
    let jti = text("jti")
        .filter(|jti| !jti.is_empty() && jti.chars().count() <= MAX_JTI_CHARS)
        .ok_or(E::MissingJti)?;
    seen.remember(&client.client_id, jti, exp, now_s)?;
    Ok(client)
}

// ---------------------------------------------------------------------------------------
// Authorization codes and PKCE (SMART App Launch, standalone)
// ---------------------------------------------------------------------------------------

/// How long an authorization code may be exchanged for a token.
pub const AUTH_CODE_LIFETIME_S: u64 = 60;
/// Most codes (live or remembered as used) held at once.
pub const AUTH_CODE_CAPACITY: usize = 10_000;
/// Random bytes in an authorization code.
const AUTH_CODE_BYTES: usize = 32;

/// Whether `verifier` is a PKCE code verifier: 43 to 128 characters of the unreserved
/// set `A-Z a-z 0-9 - . _ ~` (RFC 7636 §4.1).
pub fn is_code_verifier(verifier: &str) -> bool {
    (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// Whether `challenge` can be an S256 code challenge: the unpadded base64url text of a
/// SHA-256 digest, 43 characters.
pub fn is_s256_challenge(challenge: &str) -> bool {
    challenge.len() == 43
        && URL_SAFE_NO_PAD
            .decode(challenge)
            .is_ok_and(|digest| digest.len() == 32)
}

/// The S256 code challenge of a verifier: `BASE64URL(SHA256(ASCII(verifier)))`.
pub fn s256_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// Whether `verifier` is well formed and its S256 challenge is `challenge`.
pub fn verify_pkce(verifier: &str, challenge: &str) -> bool {
    is_code_verifier(verifier)
        && constant_time_eq(s256_challenge(verifier).as_bytes(), challenge.as_bytes())
}

/// What an authorization code stands for: who logged in, for which app and redirect URI,
/// with which PKCE challenge, and what they were granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeGrant {
    pub client_id: String,
    pub redirect_uri: String,
    pub code_challenge: String,
    /// The granted scopes, in their canonical text.
    pub scope: String,
    /// The account that logged in.
    pub username: String,
    /// The app's OpenID Connect `nonce`, repeated in the ID token.
    pub nonce: Option<String>,
}

/// Why a code was not exchanged. The token endpoint answers all but `Full` and
/// `Random` with `invalid_grant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum CodeError {
    #[error("no such authorization code")]
    Unknown,
    #[error("the authorization code has expired")]
    Expired,
    #[error("the authorization code was already used")]
    Reused,
    #[error("the authorization code was issued to another client")]
    WrongClient,
    #[error("the redirect_uri differs from the authorization request's")]
    WrongRedirectUri,
    #[error("the code_verifier does not match the code_challenge")]
    WrongVerifier,
    #[error("too many authorization codes outstanding; try again shortly")]
    Full,
    #[error("the operating system's random number source failed")]
    Random,
}

enum CodeEntry {
    Live(CodeGrant),
    /// Exchanged, or tried once: any further use is refused as a reuse.
    Used,
}

/// Authorization codes issued and not yet expired, in memory: a node restart forgets
/// them, which only makes a login in progress start again.
pub struct CodeStore {
    /// By the SHA-256 of the code, so the map holds nothing that could be exchanged.
    codes: Mutex<HashMap<[u8; 32], (CodeEntry, u64)>>,
    capacity: usize,
}

impl Default for CodeStore {
    fn default() -> Self {
        CodeStore::with_capacity(AUTH_CODE_CAPACITY)
    }
}

fn code_key(code: &str) -> [u8; 32] {
    let mut key = [0u8; 32];
    key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, code.as_bytes()).as_ref());
    key
}

impl CodeStore {
    pub fn with_capacity(capacity: usize) -> CodeStore {
        CodeStore {
            codes: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// Codes held, live or used.
    pub fn len(&self) -> usize {
        lock(&self.codes).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A fresh code (256 random bits, base64url) for `grant`, valid until
    /// `now_s + AUTH_CODE_LIFETIME_S`. When full, expired codes are forgotten first; if
    /// that frees nothing, no code is issued.
    pub fn issue(&self, grant: CodeGrant, now_s: u64) -> Result<String, CodeError> {
        let code =
            URL_SAFE_NO_PAD.encode(random_bytes(AUTH_CODE_BYTES).map_err(|_| CodeError::Random)?);
        let mut codes = lock(&self.codes);
        if codes.len() >= self.capacity {
            codes.retain(|_, (_, expires_s)| *expires_s > now_s);
            if codes.len() >= self.capacity {
                return Err(CodeError::Full);
            }
        }
        let expires_s = now_s.saturating_add(AUTH_CODE_LIFETIME_S);
        codes.insert(code_key(&code), (CodeEntry::Live(grant), expires_s));
        Ok(code)
    }

    /// Exchanges a code once. The first attempt uses the code up whatever its outcome, so
    /// a code can be tried only once; later attempts are refused as reuse until the code
    /// would have expired.
    pub fn redeem(
        &self,
        code: &str,
        client_id: &str,
        redirect_uri: &str,
        code_verifier: &str,
        now_s: u64,
    ) -> Result<CodeGrant, CodeError> {
        let key = code_key(code);
        let grant = {
            let mut codes = lock(&self.codes);
            let Some((entry, expires_s)) = codes.get_mut(&key) else {
                return Err(CodeError::Unknown);
            };
            if *expires_s <= now_s {
                codes.remove(&key);
                return Err(CodeError::Expired);
            }
            match std::mem::replace(entry, CodeEntry::Used) {
                CodeEntry::Used => return Err(CodeError::Reused),
                CodeEntry::Live(grant) => grant,
            }
        };
        if grant.client_id != client_id {
            return Err(CodeError::WrongClient);
        }
        if grant.redirect_uri != redirect_uri {
            return Err(CodeError::WrongRedirectUri);
        }
        if !verify_pkce(code_verifier, &grant.code_challenge) {
            return Err(CodeError::WrongVerifier);
        }
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING;
    use serde_json::json;

    const NOW: u64 = 1_750_000_000;
    const ISSUER: &str = "https://node.example/auth";
    const AUDIENCE: &str = "https://node.example/fhir";
    const TOKEN_URL: &str = "https://node.example/auth/token";
    const PATIENT: &str = "pt-c43886833d68409aedabc77cc435967d81f9d485";
    const PASSWORD: &str = "correct horse battery";

    fn b64_json(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
    }

    fn token_issuer() -> TokenIssuer {
        TokenIssuer::new(TokenKeys::generate().unwrap(), ISSUER, AUDIENCE, 300)
    }

    fn good_token(issuer: &TokenIssuer) -> String {
        let scopes = Scopes::parse("user/Observation.rs openid fhirUser").unwrap();
        issuer
            .issue(
                "alice@hospital-a",
                &scopes,
                None,
                Some("Practitioner/alice"),
                None,
                &["pwd", "otp"],
                NOW,
            )
            .unwrap()
            .0
    }

    fn swap_payload(token: &str, change: impl FnOnce(&mut Value)) -> String {
        let [header, payload, signature] = split_jws(token).unwrap();
        let mut claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        change(&mut claims);
        format!("{header}.{}.{signature}", b64_json(&claims))
    }

    /// A P-384 client key: its PKCS#8 form for signing and its public JWK.
    fn client_key(kid: &str) -> (Vec<u8>, Value) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref();
        let jwk = json!({
            "kty": "EC",
            "crv": "P-384",
            "x": URL_SAFE_NO_PAD.encode(&point[1..49]),
            "y": URL_SAFE_NO_PAD.encode(&point[49..97]),
            "kid": kid,
            "alg": "ES384",
            "use": "sig",
        });
        (pkcs8.as_ref().to_vec(), jwk)
    }

    fn assertion(pkcs8: &[u8], kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES384);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(pkcs8)).unwrap()
    }

    fn assertion_claims(client_id: &str, jti: &str) -> Value {
        json!({
            "iss": client_id,
            "sub": client_id,
            "aud": TOKEN_URL,
            "exp": NOW + 240,
            "iat": NOW,
            "jti": jti,
        })
    }

    /// A store holding one backend client `lab-system` with the key `k1`.
    fn client_store(dir: &Path) -> (AccountStore, Vec<u8>) {
        let store = AccountStore::open(&dir.join("accounts.json")).unwrap();
        let (pkcs8, jwk) = client_key("k1");
        store
            .add_client(Client {
                client_id: "lab-system".to_string(),
                jwks: json!({ "keys": [jwk] }),
                allowed_scopes: "system/Observation.cruds".to_string(),
                acts_as: "lab-bot@hospital-a".to_string(),
            })
            .unwrap();
        (store, pkcs8)
    }

    fn assertion_error(result: Result<Client, AuthError>) -> AssertionError {
        match result {
            Err(AuthError::ClientAssertion(e)) => e,
            other => panic!("expected an assertion error, got {other:?}"),
        }
    }

    // --- scopes ---

    #[test]
    fn parses_smart_v2_scopes_and_flags() {
        // SMART v2 resource scopes and the known non-resource scopes parse as written.
        let scopes = Scopes::parse(
            "patient/Observation.rs user/*.cruds openid fhirUser launch/patient offline_access",
        )
        .unwrap();
        assert_eq!(scopes.resource.len(), 2);
        assert_eq!(scopes.resource[0].context, ScopeContext::Patient);
        assert_eq!(
            scopes.resource[0].resource_type.as_deref(),
            Some("Observation")
        );
        assert_eq!(
            scopes.resource[0].permissions,
            Permissions {
                read: true,
                search: true,
                ..Permissions::NONE
            }
        );
        assert_eq!(scopes.resource[1].resource_type, None);
        assert_eq!(scopes.resource[1].permissions, Permissions::ALL);
        assert!(
            scopes.openid && scopes.fhir_user && scopes.launch_patient && scopes.offline_access
        );
        assert_eq!(
            scopes.to_string(),
            "patient/Observation.rs user/*.cruds openid fhirUser launch/patient offline_access"
        );
        assert_eq!(Scopes::parse("").unwrap(), Scopes::default());
    }

    #[test]
    fn reads_smart_v1_scopes_as_v2() {
        // `.read`, `.write` and `.*` become rs, cud and cruds, and same-type scopes merge.
        let scopes =
            Scopes::parse("patient/Observation.read patient/Observation.write user/Patient.*")
                .unwrap();
        assert_eq!(
            scopes.to_string(),
            "patient/Observation.cruds user/Patient.cruds"
        );
        assert_eq!(
            Scopes::parse("system/*.read").unwrap().to_string(),
            "system/*.rs"
        );
        assert_eq!(
            Scopes::parse("system/*.write").unwrap().to_string(),
            "system/*.cud"
        );
    }

    #[test]
    fn refuses_permission_letters_out_of_order_or_repeated() {
        // Only non-empty subsequences of `cruds` are valid permission letters.
        for bad in [
            "patient/Observation.sr",
            "patient/Observation.rr",
            "patient/Observation.",
            "patient/Observation.rx",
            "patient/Observation.R",
            "patient/Observation",
        ] {
            assert!(
                matches!(Scopes::parse(bad), Err(AuthError::InvalidScope(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn refuses_unknown_scopes_and_resource_types() {
        // Unknown scopes, contexts and malformed resource type names are errors.
        for bad in [
            "launch",
            "profile",
            "admin/Observation.rs",
            "patient/observation.rs",
            "patient/Obs3rvation.rs",
            "patient/.rs",
            "user/Observation.rs  bogus",
        ] {
            assert!(
                matches!(Scopes::parse(bad), Err(AuthError::InvalidScope(_))),
                "{bad}"
            );
        }
        let long = format!("patient/O{}.rs", "b".repeat(64));
        assert!(Scopes::parse(&long).is_err());
        assert!(Scopes::parse(&"openid ".repeat(2000)).is_err());
    }

    #[test]
    fn refuses_query_qualified_scopes() {
        // SMART v2 `?param=value` narrowing is refused with a message that says so.
        match Scopes::parse("patient/Observation.rs?category=laboratory") {
            Err(AuthError::InvalidScope(message)) => assert!(message.contains("not supported")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn patient_scopes_do_not_reach_user_context() {
        // `patient/*.rs` allows patient-context reads only.
        let scopes = Scopes::parse("patient/*.rs").unwrap();
        assert!(scopes.allows(ScopeContext::Patient, "Observation", Interaction::Read));
        assert!(scopes.allows(ScopeContext::Patient, "Condition", Interaction::Search));
        assert!(!scopes.allows(ScopeContext::User, "Observation", Interaction::Read));
        assert!(!scopes.allows(ScopeContext::Patient, "Observation", Interaction::Create));
        assert!(scopes.allows_any("Observation", Interaction::Read));
        assert!(!scopes.allows_any("Observation", Interaction::Update));
    }

    #[test]
    fn cru_scope_does_not_allow_delete_or_search() {
        // `user/Observation.cru` allows exactly create, read and update on Observation.
        let scopes = Scopes::parse("user/Observation.cru").unwrap();
        for interaction in [Interaction::Create, Interaction::Read, Interaction::Update] {
            assert!(scopes.allows(ScopeContext::User, "Observation", interaction));
        }
        assert!(!scopes.allows(ScopeContext::User, "Observation", Interaction::Delete));
        assert!(!scopes.allows(ScopeContext::User, "Observation", Interaction::Search));
        assert!(!scopes.allows(ScopeContext::User, "Patient", Interaction::Read));
    }

    #[test]
    fn login_asking_for_more_gets_the_intersection() {
        // Requested scopes are narrowed to the allowance, and what is not allowed at all
        // is dropped.
        let allowed = Scopes::parse("user/*.rs user/Observation.cruds openid fhirUser").unwrap();
        let requested = Scopes::parse(
            "user/Observation.cruds user/Patient.cruds patient/*.rs openid offline_access",
        )
        .unwrap();
        let granted = requested.intersect(&allowed);
        assert_eq!(
            granted.to_string(),
            "user/Observation.cruds user/Patient.rs openid"
        );
        assert!(!granted.allows(ScopeContext::User, "Patient", Interaction::Update));
        assert!(!granted.allows(ScopeContext::Patient, "Observation", Interaction::Read));
    }

    #[test]
    fn wildcard_request_is_narrowed_to_allowed_types() {
        // Asking for `*` where only named types are allowed grants those types only.
        let allowed = Scopes::parse("user/Observation.rs user/Patient.r").unwrap();
        let granted = Scopes::parse("user/*.cruds").unwrap().intersect(&allowed);
        assert_eq!(granted.to_string(), "user/Observation.rs user/Patient.r");
        let nothing = Scopes::parse("system/*.rs").unwrap().intersect(&allowed);
        assert!(nothing.is_empty());
    }

    // --- base32 and TOTP ---

    #[test]
    fn base32_matches_rfc4648() {
        // The RFC 4648 section 10 vectors round-trip, and malformed text is refused.
        for (plain, encoded) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(base32_encode(plain.as_bytes()), encoded);
            assert_eq!(base32_decode(encoded).unwrap(), plain.as_bytes());
        }
        assert_eq!(base32_decode("mzxw6ytboi======").unwrap(), b"foobar");
        for bad in ["M", "MZX", "MZXW6Y", "MZ1Q", "MZ", "MZ!Q"] {
            assert_eq!(base32_decode(bad), Err(AuthError::InvalidBase32), "{bad}");
        }
        let secret = new_totp_secret().unwrap();
        assert_eq!(secret.len(), TOTP_SECRET_BYTES);
        assert_eq!(base32_decode(&base32_encode(&secret)).unwrap(), secret);
    }

    #[test]
    fn totp_matches_rfc6238_vectors() {
        // The RFC 6238 appendix B SHA-1 vectors, in 8 digits and in our 6.
        let secret = b"12345678901234567890";
        for (time, code) in [
            (59, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ] {
            assert_eq!(
                totp_lite::totp_custom::<totp_lite::Sha1>(TOTP_STEP_S, 8, secret, time),
                code
            );
            assert_eq!(totp_code(secret, time), code[2..]);
        }
    }

    #[test]
    fn totp_accepts_one_step_of_drift() {
        // Codes from the previous, current and next step verify; two steps away do not.
        let secret = b"12345678901234567890";
        let step = NOW / TOTP_STEP_S;
        for (offset, expected) in [
            (-1i64, Some(step - 1)),
            (0, Some(step)),
            (1, Some(step + 1)),
        ] {
            let at = (NOW as i64 + offset * TOTP_STEP_S as i64) as u64;
            assert_eq!(
                verify_totp(secret, &totp_code(secret, at), NOW, 0),
                expected
            );
        }
        for offset in [-2i64, 2] {
            let at = (NOW as i64 + offset * TOTP_STEP_S as i64) as u64;
            let code = totp_code(secret, at);
            // A collision with an adjacent step's code is possible in principle; these
            // fixed inputs do not collide.
            assert_eq!(verify_totp(secret, &code, NOW, 0), None);
        }
        assert_eq!(verify_totp(secret, "12345", NOW, 0), None);
        assert_eq!(verify_totp(secret, "12345a", NOW, 0), None);
        assert_eq!(verify_totp(secret, "", 0, 0), None);
    }

    #[test]
    fn totp_refuses_a_used_step() {
        // Once a step is used its code, and codes of earlier steps, are refused.
        let secret = b"12345678901234567890";
        let code = totp_code(secret, NOW);
        let step = verify_totp(secret, &code, NOW, 0).unwrap();
        assert_eq!(verify_totp(secret, &code, NOW, step), None);
        let previous = totp_code(secret, NOW - TOTP_STEP_S);
        assert_eq!(verify_totp(secret, &previous, NOW, step), None);
        let next = totp_code(secret, NOW + TOTP_STEP_S);
        assert_eq!(verify_totp(secret, &next, NOW, step), Some(step + 1));
    }

    #[test]
    fn otpauth_uri_is_percent_encoded() {
        // Issuer and account are percent-encoded and the secret is unpadded base32.
        let uri = otpauth_uri("Med Ledger", "alice@hospital-a", b"foobar");
        assert_eq!(
            uri,
            "otpauth://totp/Med%20Ledger:alice%40hospital-a?secret=MZXW6YTBOI&issuer=Med%20Ledger&algorithm=SHA1&digits=6&period=30"
        );
    }

    // --- accounts ---

    #[test]
    fn account_login_persists_and_refuses_replay() {
        // An account logs in, the file is owner-only and survives reopening, the used
        // code cannot be replayed, and duplicates or short passwords are refused.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth").join("accounts.json");
        let store = AccountStore::open(&path).unwrap();
        assert!(!path.exists());
        let secret = store
            .add_account(
                "alice@hospital-a",
                AccountKind::Practitioner,
                PASSWORD,
                "user/*.rs openid fhirUser",
                "/keys/alice.json",
            )
            .unwrap();
        assert_eq!(
            store.add_account(
                "alice@hospital-a",
                AccountKind::Practitioner,
                PASSWORD,
                "",
                ""
            ),
            Err(AuthError::DuplicateAccount("alice@hospital-a".to_string()))
        );
        assert_eq!(
            store.add_account("bob@hospital-a", AccountKind::Practitioner, "short", "", ""),
            Err(AuthError::PasswordTooShort)
        );
        assert!(matches!(
            store.add_account(
                "bob@hospital-a",
                AccountKind::Practitioner,
                PASSWORD,
                "user/x",
                ""
            ),
            Err(AuthError::InvalidScope(_))
        ));
        assert!(matches!(
            store.add_account("bob@hospital-a", AccountKind::Patient, PASSWORD, "", ""),
            Err(AuthError::InvalidUsername(_))
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let store = AccountStore::open(&path).unwrap();
        let code = totp_code(&secret, NOW);
        let account = store
            .login("alice@hospital-a", PASSWORD, &code, NOW)
            .unwrap();
        assert_eq!(account.kind, AccountKind::Practitioner);
        assert_eq!(account.identity_file, "/keys/alice.json");
        assert_eq!(account.last_totp_step, NOW / TOTP_STEP_S);
        assert!(format!("{account:?}").contains("<redacted>"));

        let store = AccountStore::open(&path).unwrap();
        assert_eq!(
            store.account("alice@hospital-a").unwrap().last_totp_step,
            NOW / TOTP_STEP_S
        );
        assert_eq!(
            store.login("alice@hospital-a", PASSWORD, &code, NOW + 1),
            Err(AuthError::InvalidCredentials)
        );
        store.remove_account("alice@hospital-a").unwrap();
        assert!(AccountStore::open(&path)
            .unwrap()
            .account("alice@hospital-a")
            .is_none());
    }

    #[test]
    fn failed_logins_look_alike() {
        // Wrong password, wrong code and unknown user all give InvalidCredentials.
        let dir = tempfile::tempdir().unwrap();
        let store = AccountStore::open(&dir.path().join("accounts.json")).unwrap();
        let secret = store
            .add_account(PATIENT, AccountKind::Patient, PASSWORD, "patient/*.rs", "")
            .unwrap();
        let code = totp_code(&secret, NOW);
        let wrong_code = if code == "000000" { "000001" } else { "000000" };
        assert_eq!(
            store.login(PATIENT, "wrong password!", &code, NOW),
            Err(AuthError::InvalidCredentials)
        );
        assert_eq!(
            store.login(PATIENT, PASSWORD, wrong_code, NOW),
            Err(AuthError::InvalidCredentials)
        );
        assert_eq!(
            store.login("nobody@hospital-a", PASSWORD, &code, NOW),
            Err(AuthError::InvalidCredentials)
        );
        assert_eq!(store.account(PATIENT).unwrap().failed_logins, 2);
    }

    #[test]
    fn five_failures_lock_the_account_for_a_minute() {
        // After five consecutive failures even the right credentials are refused until
        // the lock ends; then they work and the count is cleared.
        let dir = tempfile::tempdir().unwrap();
        let store = AccountStore::open(&dir.path().join("accounts.json")).unwrap();
        let secret = store
            .add_account(
                "carol@clinic-b",
                AccountKind::Practitioner,
                PASSWORD,
                "user/*.rs",
                "",
            )
            .unwrap();
        for attempt in 0..MAX_FAILED_LOGINS {
            assert_eq!(
                store.login(
                    "carol@clinic-b",
                    "not the password",
                    "000000",
                    NOW + u64::from(attempt)
                ),
                Err(AuthError::InvalidCredentials)
            );
        }
        let later = NOW + 10;
        assert_eq!(
            store.login(
                "carol@clinic-b",
                PASSWORD,
                &totp_code(&secret, later),
                later
            ),
            Err(AuthError::Locked)
        );
        let unlocked = NOW + 4 + LOCKOUT_S;
        let account = store
            .login(
                "carol@clinic-b",
                PASSWORD,
                &totp_code(&secret, unlocked),
                unlocked,
            )
            .unwrap();
        assert_eq!(account.failed_logins, 0);
        assert_eq!(account.locked_until_s, 0);
    }

    #[test]
    fn unknown_users_lock_like_real_ones() {
        // Repeated failures against a username with no account end in Locked too, so a
        // lock does not reveal that an account exists.
        let dir = tempfile::tempdir().unwrap();
        let store = AccountStore::open(&dir.path().join("accounts.json")).unwrap();
        for attempt in 0..MAX_FAILED_LOGINS {
            assert_eq!(
                store.login(
                    "ghost@hospital-a",
                    PASSWORD,
                    "123456",
                    NOW + u64::from(attempt)
                ),
                Err(AuthError::InvalidCredentials)
            );
        }
        assert_eq!(
            store.login("ghost@hospital-a", PASSWORD, "123456", NOW + 10),
            Err(AuthError::Locked)
        );
        assert_eq!(
            store.login("ghost@hospital-a", PASSWORD, "123456", NOW + 4 + LOCKOUT_S),
            Err(AuthError::InvalidCredentials)
        );
    }

    // --- access tokens ---

    #[test]
    fn issued_token_verifies() {
        // A freshly issued token verifies and carries the claims it was issued with.
        let issuer = token_issuer();
        let token = good_token(&issuer);
        let claims = issuer.verify(&token, NOW + 1).unwrap();
        assert_eq!(claims.sub, "alice@hospital-a");
        assert_eq!(claims.scope, "user/Observation.rs openid fhirUser");
        assert_eq!(claims.fhir_user.as_deref(), Some("Practitioner/alice"));
        assert_eq!(claims.amr, ["pwd", "otp"]);
        assert_eq!(claims.exp, NOW + 300);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid, Some(issuer.keys().kid()));
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    }

    #[test]
    fn token_times_are_checked_exactly() {
        // A token is valid from iat up to, not including, exp.
        let issuer = token_issuer();
        let token = good_token(&issuer);
        assert!(issuer.verify(&token, NOW).is_ok());
        assert!(issuer.verify(&token, NOW + 299).is_ok());
        assert_eq!(issuer.verify(&token, NOW + 300), Err(TokenError::Expired));
        assert_eq!(issuer.verify(&token, NOW - 1), Err(TokenError::NotYetValid));
        assert_eq!(TokenError::Expired.code(), "expired");
    }

    #[test]
    fn token_for_another_audience_or_issuer_is_refused() {
        // Same key, different audience or issuer: refused with the matching error.
        let keys_pem = TokenKeys::generate().unwrap().to_pkcs8_pem();
        let ours = TokenIssuer::new(
            TokenKeys::from_pkcs8_pem(&keys_pem).unwrap(),
            ISSUER,
            AUDIENCE,
            300,
        );
        let other_audience = TokenIssuer::new(
            TokenKeys::from_pkcs8_pem(&keys_pem).unwrap(),
            ISSUER,
            "https://elsewhere.example/fhir",
            300,
        );
        let other_issuer = TokenIssuer::new(
            TokenKeys::from_pkcs8_pem(&keys_pem).unwrap(),
            "https://elsewhere.example/auth",
            AUDIENCE,
            300,
        );
        assert_eq!(
            ours.verify(&good_token(&other_audience), NOW),
            Err(TokenError::WrongAudience)
        );
        assert_eq!(
            ours.verify(&good_token(&other_issuer), NOW),
            Err(TokenError::WrongIssuer)
        );
    }

    #[test]
    fn unsigned_and_foreign_algorithm_tokens_are_refused() {
        // `alg: none`, and RS256 headers, are refused before any signature work.
        let issuer = token_issuer();
        let claims = issuer.verify(&good_token(&issuer), NOW).unwrap();
        let payload = b64_json(&serde_json::to_value(&claims).unwrap());
        let none = format!(
            "{}.{payload}.",
            b64_json(&json!({"alg": "none", "typ": "JWT"}))
        );
        assert_eq!(
            issuer.verify(&none, NOW),
            Err(TokenError::AlgorithmNotAllowed)
        );
        let rs256 = format!(
            "{}.{payload}.AAAA",
            b64_json(&json!({"alg": "RS256", "typ": "at+jwt"}))
        );
        assert_eq!(
            issuer.verify(&rs256, NOW),
            Err(TokenError::AlgorithmNotAllowed)
        );
        assert_eq!(
            issuer.verify("not a token", NOW),
            Err(TokenError::Malformed)
        );
        assert_eq!(issuer.verify("a.b.c.d", NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn hs256_token_keyed_with_the_public_key_is_refused() {
        // The classic key-confusion forgery (HMAC keyed with the public key) is refused.
        let issuer = token_issuer();
        let claims = issuer.verify(&good_token(&issuer), NOW).unwrap();
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some(ACCESS_TOKEN_TYP.to_string());
        header.kid = Some(issuer.keys().kid());
        let forged = jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(&issuer.keys().public_point),
        )
        .unwrap();
        assert_eq!(
            issuer.verify(&forged, NOW),
            Err(TokenError::AlgorithmNotAllowed)
        );
    }

    #[test]
    fn token_from_another_key_is_refused() {
        // A token signed by another node's key is refused, with or without a kid.
        let ours = token_issuer();
        let theirs = token_issuer();
        let token = good_token(&theirs);
        assert_eq!(ours.verify(&token, NOW), Err(TokenError::BadSignature));
        let claims = theirs.verify(&token, NOW).unwrap();
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some(ACCESS_TOKEN_TYP.to_string());
        let without_kid = jsonwebtoken::encode(&header, &claims, &theirs.keys().encoding).unwrap();
        assert_eq!(
            ours.verify(&without_kid, NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampered_token_is_refused() {
        // Escalating the scope in the payload while keeping the signature is refused.
        let issuer = token_issuer();
        let token = good_token(&issuer);
        let escalated = swap_payload(&token, |claims| claims["scope"] = json!("user/*.cruds"));
        assert_eq!(
            issuer.verify(&escalated, NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn token_keys_persist_owner_only() {
        // The signing key is created once, owner-only, and reloads with the same kid and
        // JWKS.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token-key.pem");
        let created = TokenKeys::load_or_create(&path).unwrap();
        let loaded = TokenKeys::load_or_create(&path).unwrap();
        assert_eq!(created.kid(), loaded.kid());
        assert_eq!(created.jwks(), loaded.jwks());
        assert_eq!(created.kid().len(), 22);
        let jwk = &created.jwks()["keys"][0];
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(jwk["alg"], "ES256");
        assert_eq!(jwk["kid"], created.kid());
        let parsed: Jwk = serde_json::from_value(jwk.clone()).unwrap();
        assert!(key_fits(&parsed, Algorithm::ES256));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            TokenKeys::from_pkcs8_pem(
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"
            ),
            Err(AuthError::InvalidKey(_))
        ));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    // --- client assertions ---

    #[test]
    fn good_es384_client_assertion_is_accepted() {
        // An ES384 assertion signed by the enrolled key authenticates the client, with
        // or without a kid.
        let dir = tempfile::tempdir().unwrap();
        let (store, pkcs8) = client_store(dir.path());
        let cache = JtiCache::new();
        let signed = assertion(&pkcs8, Some("k1"), &assertion_claims("lab-system", "one"));
        let client = verify_client_assertion(&store, &signed, TOKEN_URL, NOW, &cache).unwrap();
        assert_eq!(client.acts_as, "lab-bot@hospital-a");
        let unnamed = assertion(&pkcs8, None, &assertion_claims("lab-system", "two"));
        assert!(verify_client_assertion(&store, &unnamed, TOKEN_URL, NOW, &cache).is_ok());
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn client_assertion_for_another_audience_is_refused() {
        // An assertion addressed to another token endpoint is refused.
        let dir = tempfile::tempdir().unwrap();
        let (store, pkcs8) = client_store(dir.path());
        let mut claims = assertion_claims("lab-system", "one");
        claims["aud"] = json!("https://elsewhere.example/token");
        let signed = assertion(&pkcs8, Some("k1"), &claims);
        let result = verify_client_assertion(&store, &signed, TOKEN_URL, NOW, &JtiCache::new());
        assert_eq!(assertion_error(result), AssertionError::WrongAudience);
    }

    #[test]
    fn expired_or_long_lived_client_assertion_is_refused() {
        // Expired assertions, ones valid for over five minutes, and ones without exp are
        // refused.
        let dir = tempfile::tempdir().unwrap();
        let (store, pkcs8) = client_store(dir.path());
        let cache = JtiCache::new();
        let cases = [
            (json!(NOW), AssertionError::Expired),
            (
                json!(NOW + MAX_ASSERTION_LIFETIME_S + 1),
                AssertionError::LifetimeTooLong,
            ),
            (Value::Null, AssertionError::Malformed),
        ];
        for (index, (exp, expected)) in cases.into_iter().enumerate() {
            let mut claims = assertion_claims("lab-system", &format!("jti-{index}"));
            claims["exp"] = exp;
            let signed = assertion(&pkcs8, Some("k1"), &claims);
            let result = verify_client_assertion(&store, &signed, TOKEN_URL, NOW, &cache);
            assert_eq!(assertion_error(result), expected);
        }
        let mut claims = assertion_claims("lab-system", "no-exp");
        claims.as_object_mut().unwrap().remove("exp");
        let signed = assertion(&pkcs8, Some("k1"), &claims);
        let result = verify_client_assertion(&store, &signed, TOKEN_URL, NOW, &cache);
        assert_eq!(assertion_error(result), AssertionError::MissingExpiry);
    }

    #[test]
    fn replayed_client_assertion_is_refused() {
        // The same jti is accepted once while unexpired.
        let dir = tempfile::tempdir().unwrap();
        let (store, pkcs8) = client_store(dir.path());
        let cache = JtiCache::new();
        let signed = assertion(&pkcs8, Some("k1"), &assertion_claims("lab-system", "once"));
        assert!(verify_client_assertion(&store, &signed, TOKEN_URL, NOW, &cache).is_ok());
        let again = verify_client_assertion(&store, &signed, TOKEN_URL, NOW + 5, &cache);
        assert_eq!(assertion_error(again), AssertionError::Replayed);
    }

    #[test]
    fn assertion_from_unknown_client_is_refused() {
        // A client id that was never enrolled is refused, as is sub differing from iss.
        let dir = tempfile::tempdir().unwrap();
        let (store, pkcs8) = client_store(dir.path());
        let cache = JtiCache::new();
        let signed = assertion(&pkcs8, Some("k1"), &assertion_claims("imposter", "one"));
        let result = verify_client_assertion(&store, &signed, TOKEN_URL, NOW, &cache);
        assert_eq!(assertion_error(result), AssertionError::UnknownClient);
        let mut claims = assertion_claims("lab-system", "two");
        claims["sub"] = json!("someone-else");
        let signed = assertion(&pkcs8, Some("k1"), &claims);
        let result = verify_client_assertion(&store, &signed, TOKEN_URL, NOW, &cache);
        assert_eq!(
            assertion_error(result),
            AssertionError::IssuerSubjectMismatch
        );
    }

    #[test]
    fn assertion_signed_by_a_key_not_enrolled_is_refused() {
        // A key the client did not enrol is refused, whether or not it names a kid.
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = client_store(dir.path());
        let (stranger, _) = client_key("k1");
        let cache = JtiCache::new();
        let same_kid = assertion(&stranger, Some("k1"), &assertion_claims("lab-system", "a"));
        let result = verify_client_assertion(&store, &same_kid, TOKEN_URL, NOW, &cache);
        assert_eq!(assertion_error(result), AssertionError::BadSignature);
        let other_kid = assertion(&stranger, Some("k9"), &assertion_claims("lab-system", "b"));
        let result = verify_client_assertion(&store, &other_kid, TOKEN_URL, NOW, &cache);
        assert_eq!(assertion_error(result), AssertionError::UnknownKey);
        let no_kid = assertion(&stranger, None, &assertion_claims("lab-system", "c"));
        let result = verify_client_assertion(&store, &no_kid, TOKEN_URL, NOW, &cache);
        assert_eq!(assertion_error(result), AssertionError::BadSignature);
        // An ES256 assertion cannot be checked with the enrolled P-384 key.
        let p256 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let signed = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &assertion_claims("lab-system", "d"),
            &EncodingKey::from_ec_der(p256.as_ref()),
        )
        .unwrap();
        let result = verify_client_assertion(&store, &signed, TOKEN_URL, NOW, &cache);
        assert_eq!(assertion_error(result), AssertionError::UnknownKey);
        assert!(cache.is_empty());
    }

    #[test]
    fn client_enrolment_is_checked() {
        // Private keys, symmetric keys, non-system scopes, bad acts_as and duplicates are
        // refused at enrolment.
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = client_store(dir.path());
        let (_, jwk) = client_key("k2");
        let client = |jwks: Value, scopes: &str, acts_as: &str| Client {
            client_id: "billing".to_string(),
            jwks,
            allowed_scopes: scopes.to_string(),
            acts_as: acts_as.to_string(),
        };
        let mut private = jwk.clone();
        private["d"] = json!("AAAA");
        let refused = [
            client(json!({ "keys": [private] }), "system/*.rs", "bot@org-a"),
            client(
                json!({ "keys": [{"kty": "oct", "k": "c2VjcmV0"}] }),
                "system/*.rs",
                "bot@org-a",
            ),
            client(json!({ "keys": [] }), "system/*.rs", "bot@org-a"),
            client(json!({ "keys": [jwk.clone()] }), "user/*.rs", "bot@org-a"),
            client(
                json!({ "keys": [jwk.clone()] }),
                "system/*.rs openid",
                "bot@org-a",
            ),
            client(
                json!({ "keys": [jwk.clone()] }),
                "system/*.rs",
                "not a user",
            ),
        ];
        for bad in refused {
            assert!(matches!(
                store.add_client(bad),
                Err(AuthError::InvalidClient(_))
            ));
        }
        let mut duplicate = client(json!({ "keys": [jwk] }), "system/*.rs", "bot@org-a");
        duplicate.client_id = "lab-system".to_string();
        assert_eq!(
            store.add_client(duplicate),
            Err(AuthError::DuplicateClient("lab-system".to_string()))
        );
        let reopened = AccountStore::open(&dir.path().join("accounts.json")).unwrap();
        assert!(reopened.client("lab-system").is_some());
        reopened.remove_client("lab-system").unwrap();
        assert!(reopened.client("lab-system").is_none());
    }

    #[test]
    fn jti_cache_is_bounded() {
        // A full cache forgets expired ids and refuses new ones rather than forget live
        // ones.
        let cache = JtiCache::with_capacity(2);
        cache.remember("c", "a", NOW + 10, NOW).unwrap();
        cache.remember("c", "b", NOW + 100, NOW).unwrap();
        assert_eq!(
            cache.remember("c", "c", NOW + 100, NOW),
            Err(AssertionError::ReplayCacheFull)
        );
        cache.remember("c", "c", NOW + 100, NOW + 10).unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(
            cache.remember("c", "b", NOW + 100, NOW + 20),
            Err(AssertionError::Replayed)
        );
        cache
            .remember("other", "b", NOW + 100, NOW + 20)
            .unwrap_err();
        let roomy = JtiCache::with_capacity(10);
        roomy.remember("c", "b", NOW + 100, NOW).unwrap();
        roomy.remember("other", "b", NOW + 100, NOW).unwrap();
    }

    // ---- apps, PKCE and authorization codes ----

    const RFC7636_VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const RFC7636_CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

    fn code_grant() -> CodeGrant {
        CodeGrant {
            client_id: "my-app".to_string(),
            redirect_uri: "https://app.example/cb".to_string(),
            code_challenge: RFC7636_CHALLENGE.to_string(),
            scope: "patient/*.rs".to_string(),
            username: "pt-abc".to_string(),
            nonce: None,
        }
    }

    #[test]
    fn pkce_s256_matches_rfc7636_appendix_b() {
        // The S256 challenge of RFC 7636 Appendix B's verifier is the RFC's value, and only
        // that verifier (well formed, 43 to 128 unreserved characters) matches it.
        assert_eq!(s256_challenge(RFC7636_VERIFIER), RFC7636_CHALLENGE);
        assert!(is_s256_challenge(RFC7636_CHALLENGE));
        assert!(verify_pkce(RFC7636_VERIFIER, RFC7636_CHALLENGE));
        let mut other = RFC7636_VERIFIER.to_string();
        other.replace_range(0..1, "e");
        assert!(!verify_pkce(&other, RFC7636_CHALLENGE));
        // "plain": the challenge given as its own verifier does not match.
        assert!(!verify_pkce(RFC7636_CHALLENGE, RFC7636_CHALLENGE));
        assert!(!is_code_verifier(&"a".repeat(42)));
        assert!(is_code_verifier(&"a".repeat(43)));
        assert!(is_code_verifier(&"a-._~Z9".repeat(19)[..128]));
        assert!(!is_code_verifier(&"a".repeat(129)));
        assert!(!is_code_verifier(&format!("{}+", "a".repeat(43))));
        assert!(!is_code_verifier(&format!("{} ", "a".repeat(43))));
        // A short verifier whose challenge matches is still refused.
        let short = "a".repeat(42);
        assert!(!verify_pkce(&short, &s256_challenge(&short)));
        assert!(!is_s256_challenge(&RFC7636_CHALLENGE[..42]));
        assert!(!is_s256_challenge(&format!(
            "{}=",
            &RFC7636_CHALLENGE[..42]
        )));
    }

    #[test]
    fn a_code_is_exchanged_once_by_its_client_redirect_and_verifier() {
        // A code returns what it was issued for to the client, redirect URI and verifier
        // it is bound to, exactly once; any attempt uses it up, so a wrong client,
        // redirect URI or verifier also ends it, and every later attempt is a reuse.
        let store = CodeStore::default();
        let code = store.issue(code_grant(), NOW).unwrap();
        assert!(URL_SAFE_NO_PAD.decode(&code).unwrap().len() >= 16);
        let redeem = |code: &str, client: &str, uri: &str, verifier: &str| {
            store.redeem(code, client, uri, verifier, NOW + 1)
        };
        let cb = "https://app.example/cb";
        assert_eq!(
            redeem(&code, "my-app", cb, RFC7636_VERIFIER),
            Ok(code_grant())
        );
        assert_eq!(
            redeem(&code, "my-app", cb, RFC7636_VERIFIER),
            Err(CodeError::Reused)
        );
        assert_eq!(
            redeem("not-a-code", "my-app", cb, RFC7636_VERIFIER),
            Err(CodeError::Unknown)
        );
        for (client, uri, verifier, error) in [
            ("other-app", cb, RFC7636_VERIFIER, CodeError::WrongClient),
            (
                "my-app",
                "https://app.example/cb2",
                RFC7636_VERIFIER,
                CodeError::WrongRedirectUri,
            ),
            ("my-app", cb, &"b".repeat(43), CodeError::WrongVerifier),
            ("my-app", cb, RFC7636_CHALLENGE, CodeError::WrongVerifier),
        ] {
            let code = store.issue(code_grant(), NOW).unwrap();
            assert_eq!(redeem(&code, client, uri, verifier), Err(error));
            assert_eq!(
                redeem(&code, "my-app", cb, RFC7636_VERIFIER),
                Err(CodeError::Reused)
            );
        }
        let codes: std::collections::HashSet<String> = (0..100)
            .map(|_| store.issue(code_grant(), NOW).unwrap())
            .collect();
        assert_eq!(codes.len(), 100, "codes are random");
    }

    #[test]
    fn a_code_expires_after_sixty_seconds() {
        // A code is good until (not at) sixty seconds after it was issued.
        let store = CodeStore::default();
        let cb = "https://app.example/cb";
        let code = store.issue(code_grant(), NOW).unwrap();
        assert!(store
            .redeem(
                &code,
                "my-app",
                cb,
                RFC7636_VERIFIER,
                NOW + AUTH_CODE_LIFETIME_S - 1
            )
            .is_ok());
        let code = store.issue(code_grant(), NOW).unwrap();
        assert_eq!(
            store.redeem(
                &code,
                "my-app",
                cb,
                RFC7636_VERIFIER,
                NOW + AUTH_CODE_LIFETIME_S
            ),
            Err(CodeError::Expired)
        );
    }

    #[test]
    fn the_code_store_is_bounded() {
        // A full store forgets expired codes, used or not, and issues no new code rather
        // than forget a live one.
        let store = CodeStore::with_capacity(2);
        let first = store.issue(code_grant(), NOW).unwrap();
        store.issue(code_grant(), NOW + 10).unwrap();
        assert_eq!(store.issue(code_grant(), NOW + 10), Err(CodeError::Full));
        let cb = "https://app.example/cb";
        // Used but not expired still counts.
        store
            .redeem(&first, "my-app", cb, RFC7636_VERIFIER, NOW + 10)
            .unwrap();
        assert_eq!(store.issue(code_grant(), NOW + 10), Err(CodeError::Full));
        let third = store
            .issue(code_grant(), NOW + AUTH_CODE_LIFETIME_S)
            .unwrap();
        assert_eq!(store.len(), 2);
        assert!(store
            .redeem(
                &third,
                "my-app",
                cb,
                RFC7636_VERIFIER,
                NOW + AUTH_CODE_LIFETIME_S
            )
            .is_ok());
    }

    #[test]
    fn app_registration_is_checked_and_old_files_load() {
        // Apps need exact https redirect URIs (http only on loopback, no fragment, no user
        // information), patient/ or user/ scopes and an id no backend client has; an
        // accounts file written before apps existed still loads, and apps persist.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.json");
        std::fs::write(&path, r#"{"version":1,"accounts":[],"clients":[]}"#).unwrap();
        let store = AccountStore::open(&path).unwrap();
        assert!(store.app("my-app").is_none());
        let app = |uris: &[&str], scopes: &str| App {
            client_id: "my-app".to_string(),
            redirect_uris: uris.iter().map(|u| u.to_string()).collect(),
            allowed_scopes: scopes.to_string(),
        };
        for uri in [
            "http://app.example/cb",
            "https://app.example/cb#frag",
            "https://user@app.example/cb",
            "ftp://app.example/cb",
            "app.example/cb",
            "https:///cb",
            "https://app.example/c b",
            "http://127.0.0.1.evil.example/cb",
        ] {
            assert!(
                matches!(
                    store.add_app(app(&[uri], "patient/*.rs")),
                    Err(AuthError::InvalidClient(_))
                ),
                "{uri}"
            );
        }
        assert!(store.add_app(app(&[], "patient/*.rs")).is_err());
        assert!(store
            .add_app(app(&["https://a.example/cb"], "system/*.rs"))
            .is_err());
        assert!(store
            .add_app(app(&["https://a.example/cb"], "openid"))
            .is_err());
        let good = app(
            &[
                "https://app.example/cb?x=1",
                "http://127.0.0.1:8765/cb",
                "http://localhost/cb",
                "http://[::1]:9000/cb",
            ],
            "patient/*.rs user/Observation.rs openid fhirUser launch/patient",
        );
        store.add_app(good.clone()).unwrap();
        assert_eq!(
            store.add_app(good.clone()),
            Err(AuthError::DuplicateClient("my-app".to_string()))
        );
        assert_eq!(AccountStore::open(&path).unwrap().app("my-app"), Some(good));
        let (pkcs8_store, _) = client_store(dir.path());
        drop(pkcs8_store);
        let reopened = AccountStore::open(&path).unwrap();
        assert!(reopened.client("lab-system").is_some());
        assert!(reopened.app("my-app").is_some());
        assert!(matches!(
            reopened.add_app(App {
                client_id: "lab-system".to_string(),
                ..app(&["https://a.example/cb"], "patient/*.rs")
            }),
            Err(AuthError::DuplicateClient(_))
        ));
        reopened.remove_app("my-app").unwrap();
        assert!(AccountStore::open(&path).unwrap().app("my-app").is_none());
        assert_eq!(
            reopened.remove_app("my-app"),
            Err(AuthError::UnknownClient("my-app".to_string()))
        );
        assert_eq!(
            redirect_origin("http://[::1]:9000/cb?x"),
            "http://[::1]:9000"
        );
        assert_eq!(
            redirect_origin("https://app.example?x"),
            "https://app.example"
        );
    }
}
