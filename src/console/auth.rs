//! Who may use the console: every request carries `LABBOOK_CONSOLE_TOKEN`, as
//! `Authorization: Bearer <token>` (the API, or an ingress that adds it after single sign-on)
//! or as a session cookie the login page gives for it. Every page POST carries a CSRF token.
//!
//! Nothing is kept on the server: the session cookie is its expiry and a nonce, signed with
//! an HMAC keyed by the token (so changing the token ends every session), and the CSRF token
//! of a form is the HMAC of a random nonce that lives in its own `SameSite=Strict` cookie (a
//! form posted from another site carries neither). Tokens and MACs are compared in constant
//! time.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use hmac::{Hmac, Mac};
use rand::TryRngCore;
use rand::rngs::OsRng;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;

pub const SESSION_COOKIE: &str = "labbook_session";
pub const CSRF_COOKIE: &str = "labbook_csrf";
/// The form field that carries the CSRF token.
pub const CSRF_FIELD: &str = "csrf";
/// How long a login lasts.
pub const SESSION_HOURS: i64 = 12;
/// The largest page form the CSRF check reads (a replay of many selected dead letters).
const MAX_FORM_BYTES: usize = 4 << 20;

/// The token and what is derived from it.
pub struct Auth {
    token: SecretString,
    secure_cookie: bool,
}

impl Auth {
    pub fn new(token: SecretString, secure_cookie: bool) -> Self {
        Self {
            token,
            secure_cookie,
        }
    }

    /// Whether `candidate` is the token, in constant time (both sides hashed to one length).
    pub fn token_matches(&self, candidate: &str) -> bool {
        let want = Sha256::digest(self.token.expose_secret().as_bytes());
        let got = Sha256::digest(candidate.as_bytes());
        want.ct_eq(&got).into()
    }

    fn mac(&self, purpose: &str, value: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.token.expose_secret().as_bytes())
            .expect("HMAC takes any key length");
        mac.update(format!("labbook-console {purpose} {value}").as_bytes());
        hex(&mac.finalize().into_bytes())
    }

    fn mac_matches(&self, purpose: &str, value: &str, mac: &str) -> bool {
        self.mac(purpose, value)
            .as_bytes()
            .ct_eq(mac.as_bytes())
            .into()
    }

    /// A fresh session cookie for `operator`, valid for [`SESSION_HOURS`].
    pub fn session_cookie(&self, operator: &Operator) -> Cookie<'static> {
        let expiry = chrono::Utc::now().timestamp() + SESSION_HOURS * 3600;
        let value = format!("{expiry}.{}.{}", nonce(), hex(operator.0.as_bytes()));
        let signed = format!("{value}.{}", self.mac("session", &value));
        self.cookie(SESSION_COOKIE, signed)
    }

    /// The operator a valid, unexpired session cookie names.
    fn session(&self, jar: &CookieJar) -> Option<Operator> {
        let cookie = jar.get(SESSION_COOKIE)?;
        let (value, mac) = cookie.value().rsplit_once('.')?;
        if !self.mac_matches("session", value, mac) {
            return None;
        }
        let mut parts = value.split('.');
        let expiry = parts.next()?.parse::<i64>().ok()?;
        let name = unhex(parts.nth(1)?)?;
        (expiry > chrono::Utc::now().timestamp()).then_some(Operator(name))
    }

    fn bearer_valid(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| self.token_matches(t.trim()))
    }

    /// The CSRF token forms carry, for the nonce in the CSRF cookie.
    pub fn csrf_token(&self, nonce: &str) -> String {
        self.mac("csrf", nonce)
    }

    fn csrf_valid(&self, jar: &CookieJar, field: Option<&str>) -> bool {
        match (jar.get(CSRF_COOKIE), field) {
            (Some(cookie), Some(field)) => self.mac_matches("csrf", cookie.value(), field),
            _ => false,
        }
    }

    /// A cookie only this site's own requests carry, unreadable by scripts.
    pub fn cookie(&self, name: &'static str, value: String) -> Cookie<'static> {
        Cookie::build((name, value))
            .path("/")
            .http_only(true)
            .same_site(SameSite::Strict)
            .secure(self.secure_cookie)
            .build()
    }
}

/// 16 random bytes from the OS, in hex.
fn nonce() -> String {
    let mut bytes = [0u8; 16];
    OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the OS random number generator works");
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Who is acting: the name given at the console's login (kept in the signed session), or for
/// a bearer-token request the `X-Forwarded-User` an ingress with single sign-on adds (else
/// "API token"). Recorded with every action in the booking's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator(pub String);

impl Operator {
    /// The most characters a login name may have.
    pub const MAX_CHARS: usize = 64;

    /// A login name: 1 to [`Self::MAX_CHARS`] characters, no control characters, trimmed.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let name = raw.trim();
        if name.is_empty() {
            return Err("Say who you are: your name is recorded with what you do here.");
        }
        if name.chars().count() > Self::MAX_CHARS || name.chars().any(char::is_control) {
            return Err("A name is at most 64 characters, without control characters.");
        }
        Ok(Self(name.to_owned()))
    }

    fn from_headers(headers: &HeaderMap) -> Self {
        headers
            .get("x-forwarded-user")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Self::parse(v).ok())
            .unwrap_or_else(|| Self("API token".into()))
    }
}

/// The CSRF token of this request's pages (the CSRF cookie's nonce, set by [`pages`]).
#[derive(Clone)]
pub struct CsrfToken(pub String);

/// Pages: a valid session or bearer token, else the login page; a CSRF cookie for the forms;
/// on a POST, the form's CSRF token checked before the handler sees anything.
pub async fn pages(
    State(state): State<AppState>,
    jar: CookieJar,
    mut req: Request,
    next: Next,
) -> Response {
    let auth = &state.auth;
    let operator = auth.session(&jar).or_else(|| {
        auth.bearer_valid(req.headers())
            .then(|| Operator::from_headers(req.headers()))
    });
    let Some(operator) = operator else {
        if req.method() == Method::GET {
            let next = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let to = format!("/login?next={}", urlencode(next));
            return Redirect::to(&to).into_response();
        }
        return refused(StatusCode::UNAUTHORIZED, "log in first");
    };
    req.extensions_mut().insert(operator);
    if req.method() == Method::POST {
        match check_form_csrf(auth, &jar, req).await {
            Ok(checked) => req = checked,
            Err(response) => return response,
        }
    }
    with_csrf_cookie(auth, jar, req, next).await
}

/// Gives the request a [`CsrfToken`] (making the cookie if the browser has none) and runs it.
pub async fn with_csrf_cookie(
    auth: &Auth,
    jar: CookieJar,
    mut req: Request,
    next: Next,
) -> Response {
    let (jar, nonce) = match jar.get(CSRF_COOKIE).map(|c| c.value().to_owned()) {
        Some(nonce) => (jar, nonce),
        None => {
            let nonce = nonce();
            (jar.add(auth.cookie(CSRF_COOKIE, nonce.clone())), nonce)
        }
    };
    req.extensions_mut()
        .insert(CsrfToken(auth.csrf_token(&nonce)));
    (jar, next.run(req).await).into_response()
}

/// Reads the form body, checks its CSRF field against the cookie, and puts the body back.
async fn check_form_csrf(auth: &Auth, jar: &CookieJar, req: Request) -> Result<Request, Response> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| refused(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large"))?;
    let field = url::form_urlencoded::parse(&bytes)
        .find(|(k, _)| k == CSRF_FIELD)
        .map(|(_, v)| v.into_owned());
    if !auth.csrf_valid(jar, field.as_deref()) {
        tracing::warn!(path = %parts.uri.path(), "refused a POST without a valid CSRF token");
        return Err(refused(
            StatusCode::FORBIDDEN,
            "this form has expired or did not come from the console: reload the page and try again",
        ));
    }
    Ok(Request::from_parts(parts, axum::body::Body::from(bytes)))
}

/// The API: `Authorization: Bearer <token>`, else 401 with a JSON reason.
pub async fn api(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if state.auth.bearer_valid(req.headers()) {
        let operator = Operator::from_headers(req.headers());
        req.extensions_mut().insert(operator);
        return next.run(req).await;
    }
    let body = serde_json::json!({
        "error": "unauthorized",
        "reasons": ["send the console token as Authorization: Bearer <token>"],
    });
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"labbook\"")],
        axum::Json(body),
    )
        .into_response()
}

/// A short plain-text refusal.
pub fn refused(status: StatusCode, why: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        why,
    )
        .into_response()
}

pub fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Where to go after logging in: a path of this site, never another site.
///
/// `next` must be a relative path as the browser will read it: one leading `/` not followed
/// by another or by a backslash, no scheme or authority, no control character, space or
/// backslash anywhere, and none of those hidden behind percent-encoding either (browsers strip
/// tabs and newlines from a `Location` and treat `\` as `/`, so `/%09/evil.example` or
/// `/\evil` would leave the site). Anything else goes to `/`.
pub fn safe_next(next: Option<&str>) -> &str {
    next.filter(|n| is_own_path(n)).unwrap_or("/")
}

fn is_own_path(next: &str) -> bool {
    let path_like = |bytes: &[u8]| {
        bytes.first() == Some(&b'/')
            && !matches!(bytes.get(1), Some(b'/' | b'\\'))
            && !bytes.iter().any(|b| b.is_ascii_control() || *b == b'\\')
    };
    // As sent, only printable ASCII (a browser percent-encodes the rest of a URL it sends);
    // once and twice percent-decoded, still a path of this site: a proxy or a browser may
    // decode before it follows.
    let once = percent_decode(next.as_bytes());
    let twice = percent_decode(&once);
    next.len() <= 2048
        && next.bytes().all(|b| b.is_ascii_graphic())
        && path_like(next.as_bytes())
        && path_like(&once)
        && path_like(&twice)
}

/// `%XX` decoded once (anything else kept as it is), as a browser or proxy might.
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Checks a login form: the CSRF token, the console token, then the operator's name.
pub fn login_ok(
    auth: &Auth,
    jar: &CookieJar,
    csrf: &str,
    (token, name): (&str, &str),
) -> Result<Operator, &'static str> {
    if !auth.csrf_valid(jar, Some(csrf)) {
        return Err("This form has expired: try again.");
    }
    if !auth.token_matches(token.trim()) {
        return Err("That is not the console token.");
    }
    Operator::parse(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new("a-console-token-of-32-characters".to_owned().into(), false)
    }

    #[test]
    fn the_token_matches_only_itself() {
        let a = auth();
        assert!(a.token_matches("a-console-token-of-32-characters"));
        assert!(!a.token_matches("a-console-token-of-32-character"));
        assert!(!a.token_matches(""));
    }

    #[test]
    fn sessions_and_csrf_tokens_are_signed_by_the_token() {
        let a = auth();
        let alice = Operator::parse(" Alice Ops. ").unwrap();
        let cookie = a.session_cookie(&alice);
        assert!(cookie.http_only().unwrap_or(false));
        assert_eq!(cookie.same_site(), Some(SameSite::Strict));
        let jar = CookieJar::new().add(cookie.clone());
        assert_eq!(a.session(&jar), Some(Operator("Alice Ops.".into())));
        let other = Auth::new("another-token-of-enough-length!!".to_owned().into(), false);
        assert_eq!(other.session(&jar), None, "a new token ends old sessions");
        let forged = format!("{}0", cookie.value());
        assert_eq!(
            a.session(&CookieJar::new().add(Cookie::new(SESSION_COOKIE, forged))),
            None
        );
        let (value, _) = cookie.value().rsplit_once('.').unwrap();
        let renamed = value.replace(&hex(b"Alice Ops."), &hex(b"mallory"));
        let renamed = format!("{renamed}.{}", a.mac("session", value));
        assert_eq!(
            a.session(&CookieJar::new().add(Cookie::new(SESSION_COOKIE, renamed))),
            None
        );
        assert!(Operator::parse("  ").is_err() && Operator::parse("a\nb").is_err());

        let jar = CookieJar::new().add(Cookie::new(CSRF_COOKIE, "n1"));
        assert!(a.csrf_valid(&jar, Some(&a.csrf_token("n1"))));
        assert!(!a.csrf_valid(&jar, Some(&a.csrf_token("n2"))));
        assert!(!a.csrf_valid(&jar, None));
        assert!(!a.csrf_valid(&CookieJar::new(), Some(&a.csrf_token("n1"))));
    }

    #[test]
    fn login_only_returns_to_this_site() {
        assert_eq!(
            safe_next(Some("/bookings?state=failed")),
            "/bookings?state=failed"
        );
        assert_eq!(safe_next(Some("/bookings/b-1")), "/bookings/b-1");
        assert_eq!(safe_next(Some("/bookings?q=a%20b")), "/bookings?q=a%20b");
        for bypass in [
            "//evil.example",
            "https://evil.example",
            "evil.example",
            "/\t/evil.example",
            "/%09/evil.example",
            "/\n/evil.example",
            "/%0a/evil.example",
            "/\\evil.example",
            "/%5Cevil.example",
            "/%5cevil.example",
            "%2F%2Fevil.example",
            "/%2F/evil.example",
            "/%252F/evil.example",
            "\\\\evil.example",
            "/\u{3000}/evil.example",
            " //evil.example",
            "",
            "javascript:alert(1)",
            "/\0/evil.example",
        ] {
            assert_eq!(
                safe_next(Some(bypass)),
                "/",
                "{bypass:?} must not be followed"
            );
        }
        assert_eq!(safe_next(None), "/");
    }
}
