//! SMART App Launch, standalone: the authorization endpoint (`/auth/authorize`).
//!
//! A registered app (a public client) sends the person's browser here with its request.
//! Until the app and its exact redirect URI are known, a refusal is a page shown here and
//! never a redirect (RFC 6749 §4.1.2.1), so nobody can use this server to send a browser
//! to an address of their choice. Once they are known, a refusal goes back to the app as
//! `error` and `state`. A good request gets a login page; a good login a redirect with a
//! one-time code, which the app exchanges at `/auth/token` with its PKCE verifier.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{decode_pairs, FhirState};
use crate::auth::{
    is_s256_challenge, percent_encode, redirect_origin, App, AuthError, CodeError, CodeGrant,
    Scopes,
};

/// Longest `state` an app may send; it comes back in the redirect.
const MAX_STATE_BYTES: usize = 1024;

/// The request's parameters that the login form carries through, in order.
const CARRIED: [&str; 8] = [
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "aud",
    "code_challenge",
    "nonce",
];

/// A request that passed every check.
struct Checked {
    app: App,
    params: HashMap<&'static str, String>,
    /// The request's scopes narrowed to what the app may have.
    scopes: Scopes,
}

enum Refusal {
    /// Before the app and redirect URI are known good: a page here, never a redirect.
    Page(String),
    /// Sent back to the app (RFC 6749 §4.1.2.1).
    Redirect {
        redirect_uri: String,
        error: &'static str,
        description: String,
        state: Option<String>,
    },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Page(message) => page(
                StatusCode::BAD_REQUEST,
                None,
                &format!(
                    "<h1>This login request cannot be handled</h1><p>{}</p>\
                     <p>Go back to the app you came from and try again.</p>",
                    escape(&message)
                ),
            ),
            Refusal::Redirect {
                redirect_uri,
                error,
                description,
                state,
            } => {
                let mut params = vec![("error", error), ("error_description", &description)];
                if let Some(state) = &state {
                    params.push(("state", state));
                }
                redirect(&redirect_uri, &params)
            }
        }
    }
}

/// The one value of `name`; Err when it appears more than once.
fn single<'a>(pairs: &'a [(String, String)], name: &str) -> Result<Option<&'a str>, ()> {
    let mut values = pairs.iter().filter(|(n, _)| n == name).map(|(_, v)| v);
    let first = values.next();
    if values.next().is_some() {
        return Err(());
    }
    Ok(first.map(String::as_str))
}

/// Checks an authorization request (the query of the GET, or the form of the POST, which
/// carries the same parameters).
fn check(state: &FhirState, pairs: &[(String, String)]) -> Result<Checked, Refusal> {
    let client_id = match single(pairs, "client_id") {
        Ok(Some(id)) if !id.is_empty() => id,
        Ok(_) => {
            return Err(Refusal::Page(
                "The request names no app (client_id).".into(),
            ))
        }
        Err(()) => return Err(Refusal::Page("client_id appears more than once.".into())),
    };
    let Some(app) = state.accounts().app(client_id) else {
        return Err(Refusal::Page(
            "The app is not registered at this server.".into(),
        ));
    };
    let redirect_uri = match single(pairs, "redirect_uri") {
        Ok(Some(uri)) if app.redirect_uris.iter().any(|known| known == uri) => uri.to_string(),
        Ok(_) | Err(()) => {
            return Err(Refusal::Page(
                "The redirect_uri is missing or not one the app registered.".into(),
            ))
        }
    };
    // From here on, refusals go back to the app.
    let app_state = single(pairs, "state").ok().flatten().map(str::to_string);
    let refuse = |error: &'static str, description: &str| Refusal::Redirect {
        redirect_uri: redirect_uri.clone(),
        error,
        description: description.to_string(),
        state: app_state.clone(),
    };
    let mut params = HashMap::new();
    for name in CARRIED.iter().chain(&["code_challenge_method"]) {
        match single(pairs, name) {
            Ok(value) => {
                params.insert(*name, value.unwrap_or("").to_string());
            }
            Err(()) => {
                return Err(refuse(
                    "invalid_request",
                    &format!("{name} appears more than once"),
                ))
            }
        }
    }
    if params["response_type"] != "code" {
        return Err(refuse(
            "unsupported_response_type",
            "response_type must be code",
        ));
    }
    if params["state"].is_empty() || params["state"].len() > MAX_STATE_BYTES {
        return Err(refuse(
            "invalid_request",
            "state is required (at most 1024 bytes)",
        ));
    }
    if params["nonce"].len() > MAX_STATE_BYTES {
        return Err(refuse("invalid_request", "nonce is at most 1024 bytes"));
    }
    let base = state.config.base_url.trim_end_matches('/');
    if params["aud"].trim_end_matches('/') != base {
        return Err(refuse(
            "invalid_request",
            "aud must be this server's FHIR base URL",
        ));
    }
    if params["code_challenge_method"] != "S256" {
        return Err(refuse(
            "invalid_request",
            "PKCE is required: code_challenge_method must be S256",
        ));
    }
    if !is_s256_challenge(&params["code_challenge"]) {
        return Err(refuse(
            "invalid_request",
            "code_challenge must be a base64url SHA-256 digest (43 characters)",
        ));
    }
    let requested = Scopes::parse(&params["scope"])
        .map_err(|e: AuthError| refuse("invalid_scope", &e.to_string()))?;
    let allowed = Scopes::parse(&app.allowed_scopes)
        .map_err(|_| refuse("server_error", "the app's registered scopes do not parse"))?;
    let scopes = requested.intersect(&allowed);
    if !scopes.reaches_resources() {
        return Err(refuse(
            "invalid_scope",
            "none of the requested resource scopes is allowed for this app",
        ));
    }
    Ok(Checked {
        app,
        params,
        scopes,
    })
}

/// `GET /auth/authorize`: checks the app's request and shows the login page.
pub(super) async fn authorize_form(
    State(state): State<Arc<FhirState>>,
    query: RawQuery,
) -> Response {
    let Some(pairs) = decode_pairs(query.0.as_deref().unwrap_or("")) else {
        return Refusal::Page("The request is not well encoded.".into()).into_response();
    };
    match check(&state, &pairs) {
        Ok(checked) => login_page(&state, &checked, None, ""),
        Err(refusal) => refusal.into_response(),
    }
}

/// `POST /auth/authorize` (the login form): checks the request again, then the login
/// (password and one-time code, with the same lockout as `/auth/token`), and sends the
/// browser back to the app with a code for what the app and the account may both have.
pub(super) async fn authorize_login(State(state): State<Arc<FhirState>>, body: Bytes) -> Response {
    let Some(pairs) = std::str::from_utf8(&body).ok().and_then(decode_pairs) else {
        return Refusal::Page("The form is not well encoded.".into()).into_response();
    };
    let checked = match check(&state, &pairs) {
        Ok(checked) => checked,
        Err(refusal) => return refusal.into_response(),
    };
    let field = |name: &str| {
        single(&pairs, name)
            .ok()
            .flatten()
            .unwrap_or("")
            .to_string()
    };
    let (username, password, code) = (field("username"), field("password"), field("totp"));
    let now_s = state.now_s();
    let accounts = state.accounts();
    let who = username.clone();
    // argon2 is deliberately slow: off the async threads.
    let login =
        tokio::task::spawn_blocking(move || accounts.login(&who, &password, &code, now_s)).await;
    let redirect_uri = checked.params["redirect_uri"].clone();
    let app_state = checked.params["state"].clone();
    let failure = |error: &'static str, description: &str| {
        Refusal::Redirect {
            redirect_uri: redirect_uri.clone(),
            error,
            description: description.to_string(),
            state: Some(app_state.clone()),
        }
        .into_response()
    };
    let account = match login {
        Ok(Ok(account)) => account,
        // The person may try again; the app hears nothing until they succeed or leave.
        Ok(Err(e @ (AuthError::InvalidCredentials | AuthError::Locked))) => {
            return login_page(&state, &checked, Some(&e.to_string()), &username)
        }
        Ok(Err(_)) | Err(_) => return failure("server_error", "the login could not be checked"),
    };
    let Ok(allowed) = Scopes::parse(&account.allowed_scopes) else {
        return failure("server_error", "the account's scopes do not parse");
    };
    let granted = checked.scopes.intersect(&allowed);
    if !granted.reaches_resources() {
        return failure(
            "access_denied",
            "this account may hold none of the scopes the app asked for",
        );
    }
    let grant = CodeGrant {
        client_id: checked.app.client_id.clone(),
        redirect_uri: redirect_uri.clone(),
        code_challenge: checked.params["code_challenge"].clone(),
        scope: granted.to_string(),
        username: account.username.clone(),
        nonce: Some(checked.params["nonce"].clone()).filter(|nonce| !nonce.is_empty()),
    };
    match state.codes.issue(grant, now_s) {
        Ok(code) => redirect(&redirect_uri, &[("code", &code), ("state", &app_state)]),
        Err(CodeError::Full) => failure(
            "temporarily_unavailable",
            "too many logins in progress; try again shortly",
        ),
        Err(_) => failure("server_error", "no code could be issued"),
    }
}

/// A 303 to `uri` with `params` added to its query.
fn redirect(uri: &str, params: &[(&str, &str)]) -> Response {
    let query: Vec<String> = params
        .iter()
        .map(|(name, value)| format!("{name}={}", percent_encode(value)))
        .collect();
    let separator = if uri.contains('?') { '&' } else { '?' };
    let location = format!("{uri}{separator}{}", query.join("&"));
    let Ok(location) = HeaderValue::from_str(&location) else {
        return page(
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            "<h1>The app's address cannot be used</h1>",
        );
    };
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, location);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// The login page for a checked request, with an error from the last attempt.
fn login_page(
    state: &FhirState,
    checked: &Checked,
    error: Option<&str>,
    username: &str,
) -> Response {
    let mut hidden = String::new();
    for name in CARRIED {
        hidden.push_str(&format!(
            "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
            escape(&checked.params[name])
        ));
    }
    hidden.push_str("<input type=\"hidden\" name=\"code_challenge_method\" value=\"S256\">");
    let error = error
        .map(|e| format!("<p role=\"alert\"><strong>{}</strong></p>", escape(e)))
        .unwrap_or_default();
    let redirect_uri = &checked.params["redirect_uri"];
    let body = format!(
        "<h1>Log in to {org}</h1>\
         <p>The app <strong>{app}</strong> asks for: <code>{scopes}</code></p>{error}\
         <form method=\"post\" action=\"authorize\">{hidden}\
         <p><label>Username <input name=\"username\" value=\"{username}\" autocomplete=\"username\" required></label></p>\
         <p><label>Password <input type=\"password\" name=\"password\" autocomplete=\"current-password\" required></label></p>\
         <p><label>One-time code <input name=\"totp\" inputmode=\"numeric\" autocomplete=\"one-time-code\" required></label></p>\
         <p><button type=\"submit\">Log in</button></p></form>\
         <p>After logging in you go back to {origin}.</p>",
        org = escape(state.records.org()),
        app = escape(&checked.app.client_id),
        scopes = escape(&checked.scopes.to_string()),
        username = escape(username),
        origin = escape(redirect_origin(redirect_uri)),
    );
    page(StatusCode::OK, Some(redirect_origin(redirect_uri)), &body)
}

/// An HTML page that loads nothing, cannot be framed and is not cached. `form_target` is
/// the origin the login form's answer redirects to, which the form may reach.
fn page(status: StatusCode, form_target: Option<&str>, body: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Log in: medledger</title></head><body>{body}</body></html>"
    );
    let form_action = match form_target {
        Some(origin) => format!("'self' {origin}"),
        None => "'none'".to_string(),
    };
    let csp = format!(
        "default-src 'none'; form-action {form_action}; frame-ancestors 'none'; base-uri 'none'"
    );
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(csp) = HeaderValue::from_str(&csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Text made safe inside HTML elements and quoted attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_and_query_escaping() {
        // Everything echoed into the page is escaped, and redirect parameters are
        // percent-encoded, so a crafted state or username cannot break out of either.
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(percent_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
