//! The booking message of docs/contract.md §3: parsing and validation into [`Booking`].

use std::fmt;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use serde_json::{Map, Value};

/// Largest body accepted on `booking-created`.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The upstream's booking id: 1–64 characters of `A-Z a-z 0-9 . _ : -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BookingId(String);

impl BookingId {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if raw.is_empty() || raw.len() > 64 {
            return Err(format!(
                "booking_id must be 1 to 64 characters (got {})",
                raw.chars().count()
            ));
        }
        if !raw.chars().all(ok_char) {
            return Err("booking_id may only contain A-Z a-z 0-9 . _ : -".into());
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BookingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One email address without a display name, at most 254 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.chars().count() > 254 {
            return Err("email must be at most 254 characters".into());
        }
        if raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("email must be one address, without spaces or line breaks".into());
        }
        if raw.contains(['<', '>', ',', ';']) {
            return Err("email must be one plain address, without a display name".into());
        }
        raw.parse::<lettre::Address>()
            .map_err(|_| "email is not a valid address".to_string())?;
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How many trainee accounts a booking asks for: 1 ..= the configured maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserCount(u32);

impl UserCount {
    pub fn new(n: u32, max: u32) -> Result<Self, String> {
        if n == 0 || n > max {
            return Err(format!(
                "number_of_users must be an integer from 1 to {max} (got {n})"
            ));
        }
        Ok(Self(n))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// The configured limits a booking is checked against.
#[derive(Debug, Clone, Copy)]
pub struct BookingRules {
    pub max_users: u32,
    pub default_duration_minutes: u32,
}

impl Default for BookingRules {
    fn default() -> Self {
        Self {
            max_users: 50,
            default_duration_minutes: 180,
        }
    }
}

pub const MIN_DURATION_MINUTES: u32 = 15;
pub const MAX_DURATION_MINUTES: u32 = 1440;

/// The largest `revision` (docs/contract.md §3a: 0 ..= 2^31-1).
pub const MAX_REVISION: u32 = i32::MAX as u32;

/// A valid booking, with defaults applied and the time in UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booking {
    pub id: BookingId,
    pub email: EmailAddress,
    pub booking_time: DateTime<Utc>,
    pub number_of_users: UserCount,
    pub duration_minutes: u32,
    /// The upstream's revision of this content (§3a); 0 when absent.
    pub revision: u32,
}

impl Booking {
    pub fn ends_at(&self) -> DateTime<Utc> {
        self.booking_time + Duration::minutes(i64::from(self.duration_minutes))
    }

    /// Refuses a booking whose end (`booking_time + duration`) is not after `now`.
    pub fn check_not_over(&self, now: DateTime<Utc>) -> Result<(), InvalidBooking> {
        if self.ends_at() <= now {
            return Err(InvalidBooking(format!(
                "the booking ended at {} and is already past",
                crate::format_time(self.ends_at())
            )));
        }
        Ok(())
    }
}

impl crate::broker::Subject for Booking {
    fn subject(&self) -> &str {
        self.id.as_str()
    }
}

/// A cancellation (`"cancelled": true`, §3a): only the id and the revision count; any other
/// field it carries was checked like a booking's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancellation {
    pub id: BookingId,
    pub revision: u32,
}

/// What a `booking-created` message asks: a booking (new, the same again, or an update), or
/// its cancellation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BookingMessage {
    Book(Booking),
    Cancel(Cancellation),
}

impl BookingMessage {
    pub fn id(&self) -> &BookingId {
        match self {
            BookingMessage::Book(b) => &b.id,
            BookingMessage::Cancel(c) => &c.id,
        }
    }

    pub fn revision(&self) -> u32 {
        match self {
            BookingMessage::Book(b) => b.revision,
            BookingMessage::Cancel(c) => c.revision,
        }
    }
}

impl crate::broker::Subject for BookingMessage {
    fn subject(&self) -> &str {
        self.id().as_str()
    }
}

/// The `booking_id` of a body that may be invalid otherwise, when it is a valid id: so that a
/// refused booking's dead letter, logs and events can still name it.
pub fn peek_booking_id(body: &[u8]) -> Option<BookingId> {
    peek(body).0
}

/// The valid `booking_id` and the `revision` (0 when absent or not an integer in range) of a
/// body that may be invalid otherwise: what a `rejected` event names.
pub fn peek(body: &[u8]) -> (Option<BookingId>, u32) {
    #[derive(serde::Deserialize)]
    struct Peek {
        booking_id: Option<Value>,
        revision: Option<Value>,
    }
    let Ok(peek) = serde_json::from_slice::<Peek>(body) else {
        return (None, 0);
    };
    let id = match peek.booking_id {
        Some(Value::String(s)) => BookingId::parse(&s).ok(),
        _ => None,
    };
    let revision = peek
        .revision
        .and_then(|v| v.as_u64())
        .and_then(|r| u32::try_from(r).ok())
        .filter(|r| *r <= MAX_REVISION)
        .unwrap_or(0);
    (id, revision)
}

/// Why a booking message was refused. The text is safe for a dead-letter header: it names the
/// rule that was broken, never a large piece of the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidBooking(pub String);

/// Parses a `booking-created` body under `rules` and refuses a booking that ended before `now`.
pub fn parse_booking(
    body: &[u8],
    content_type: Option<&str>,
    rules: &BookingRules,
    now: DateTime<Utc>,
) -> Result<Booking, InvalidBooking> {
    let booking = parse_booking_content(body, content_type, rules)?;
    booking.check_not_over(now)?;
    Ok(booking)
}

/// Parses a `booking-created` body that must be a booking (not a cancellation) under `rules`,
/// without looking at the clock.
pub fn parse_booking_content(
    body: &[u8],
    content_type: Option<&str>,
    rules: &BookingRules,
) -> Result<Booking, InvalidBooking> {
    match parse_message(body, content_type, rules)? {
        BookingMessage::Book(booking) => Ok(booking),
        BookingMessage::Cancel(_) => Err(InvalidBooking(
            "this message cancels a booking (\"cancelled\": true)".into(),
        )),
    }
}

/// Parses a `booking-created` body under `rules`, without looking at the clock (a booking
/// stored before is compared before its time is judged): a booking, or a cancellation.
pub fn parse_message(
    body: &[u8],
    content_type: Option<&str>,
    rules: &BookingRules,
) -> Result<BookingMessage, InvalidBooking> {
    let fields = json_object(body, content_type)?;
    let id = BookingId::parse(required_str(&fields, "booking_id")?).map_err(InvalidBooking)?;
    let revision = match integer(&fields, "revision")? {
        None => 0,
        Some(r) if (0..=i128::from(MAX_REVISION)).contains(&r) => r as u32,
        Some(r) => {
            return Err(InvalidBooking(format!(
                "revision must be an integer from 0 to {MAX_REVISION} (got {r})"
            )));
        }
    };
    let cancelled = match fields.get("cancelled") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(InvalidBooking(format!(
                "cancelled must be true or false (got {})",
                kind_of(other)
            )));
        }
    };
    if cancelled {
        check_present_fields(&fields, rules)?;
        return Ok(BookingMessage::Cancel(Cancellation { id, revision }));
    }
    Ok(BookingMessage::Book(Booking {
        id,
        email: email(&fields)?,
        booking_time: booking_time(&fields)?,
        number_of_users: number_of_users(&fields, rules)?,
        duration_minutes: duration_minutes(&fields, rules)?,
        revision,
    }))
}

/// A cancellation may leave out every field but its id; those it carries must be valid.
fn check_present_fields(
    fields: &Map<String, Value>,
    rules: &BookingRules,
) -> Result<(), InvalidBooking> {
    let present = |name: &str| !matches!(fields.get(name), None | Some(Value::Null));
    if present("email") {
        email(fields)?;
    }
    if present("booking_time") {
        booking_time(fields)?;
    }
    if present("number_of_users") {
        number_of_users(fields, rules)?;
    }
    duration_minutes(fields, rules)?;
    Ok(())
}

fn email(fields: &Map<String, Value>) -> Result<EmailAddress, InvalidBooking> {
    EmailAddress::parse(required_str(fields, "email")?).map_err(InvalidBooking)
}

fn booking_time(fields: &Map<String, Value>) -> Result<DateTime<Utc>, InvalidBooking> {
    let raw = required_str(fields, "booking_time")?;
    Ok(DateTime::parse_from_rfc3339(raw)
        .map_err(|_| {
            InvalidBooking(
                "booking_time must be an RFC 3339 time with an offset, e.g. 2026-12-01T09:00:00+08:00"
                    .into(),
            )
        })?
        .with_timezone(&Utc)
        // PostgreSQL keeps microseconds: compare what can be stored.
        .trunc_subsecs(6))
}

fn number_of_users(
    fields: &Map<String, Value>,
    rules: &BookingRules,
) -> Result<UserCount, InvalidBooking> {
    let users = integer(fields, "number_of_users")?
        .ok_or_else(|| InvalidBooking("number_of_users is required".into()))?;
    UserCount::new(u32::try_from(users).unwrap_or(0), rules.max_users).map_err(|_| {
        InvalidBooking(format!(
            "number_of_users must be an integer from 1 to {} (got {users})",
            rules.max_users
        ))
    })
}

fn duration_minutes(
    fields: &Map<String, Value>,
    rules: &BookingRules,
) -> Result<u32, InvalidBooking> {
    match integer(fields, "duration_minutes")? {
        None => Ok(rules.default_duration_minutes),
        Some(d)
            if (i128::from(MIN_DURATION_MINUTES)..=i128::from(MAX_DURATION_MINUTES))
                .contains(&d) =>
        {
            Ok(d as u32)
        }
        Some(d) => Err(InvalidBooking(format!(
            "duration_minutes must be an integer from {MIN_DURATION_MINUTES} to {MAX_DURATION_MINUTES} (got {d})"
        ))),
    }
}

/// The body as a JSON object with distinct keys, after the content type and size rules.
fn json_object(
    body: &[u8],
    content_type: Option<&str>,
) -> Result<Map<String, Value>, InvalidBooking> {
    let invalid = |s: String| InvalidBooking(s);
    if let Some(ct) = content_type {
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(invalid(format!(
                "content type must be application/json (got {})",
                truncate(ct, 60)
            )));
        }
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(invalid(format!(
            "body is {} bytes; at most {MAX_BODY_BYTES} are accepted",
            body.len()
        )));
    }
    let text = std::str::from_utf8(body).map_err(|_| invalid("body is not UTF-8".into()))?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        invalid(format!(
            "body is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    if !value.is_object() {
        return Err(invalid("body must be a JSON object".into()));
    }
    let UniqueKeys(fields) =
        serde_json::from_str(text).map_err(|e| invalid(format!("body is ambiguous: {e}")))?;
    Ok(fields)
}

/// A JSON object whose keys are all different: with a repeated key (`"number_of_users"`
/// twice) the booking would mean what the last one says, which its sender may not know.
struct UniqueKeys(Map<String, Value>);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = UniqueKeys;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut map = Map::new();
                while let Some(key) = access.next_key::<String>()? {
                    if map.contains_key(&key) {
                        let shown: String = key.chars().take(40).collect();
                        return Err(serde::de::Error::custom(format!(
                            "the field {shown:?} appears twice"
                        )));
                    }
                    let value: Value = access.next_value()?;
                    map.insert(key, value);
                }
                Ok(UniqueKeys(map))
            }
        }
        d.deserialize_map(Keys)
    }
}

fn required_str<'a>(fields: &'a Map<String, Value>, name: &str) -> Result<&'a str, InvalidBooking> {
    match fields.get(name) {
        None | Some(Value::Null) => Err(InvalidBooking(format!("{name} is required"))),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(InvalidBooking(format!(
            "{name} must be a string (got {})",
            kind_of(other)
        ))),
    }
}

/// A JSON integer field; `null` or absent is `None`. `3.0` and `"3"` are refused.
fn integer(fields: &Map<String, Value>, name: &str) -> Result<Option<i128>, InvalidBooking> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {
            Ok(n.as_i64().map(i128::from).or(n.as_u64().map(i128::from)))
        }
        Some(other) => Err(InvalidBooking(format!(
            "{name} must be a JSON integer (got {})",
            kind_of(other)
        ))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a non-integer number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(max).collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-26T00:00:00Z".parse().unwrap()
    }

    fn parse(body: &str) -> Result<Booking, InvalidBooking> {
        parse_booking(
            body.as_bytes(),
            Some("application/json"),
            &BookingRules::default(),
            now(),
        )
    }

    const VALID: &str = r#"{"booking_id":"course-42-session-7","email":"trainer@example.org",
        "booking_time":"2026-12-01T09:00:00+08:00","number_of_users":12,"duration_minutes":180}"#;

    #[test]
    fn a_valid_booking_is_parsed_into_utc() {
        let b = parse(VALID).unwrap();
        assert_eq!(b.id.as_str(), "course-42-session-7");
        assert_eq!(
            b.booking_time,
            "2026-12-01T01:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(b.number_of_users.get(), 12);
        assert_eq!(b.duration_minutes, 180);
    }

    #[test]
    fn duration_defaults_when_absent_or_null() {
        let body = VALID.replace(r#","duration_minutes":180"#, "");
        assert_eq!(parse(&body).unwrap().duration_minutes, 180);
        let body = VALID.replace("180", "null");
        assert_eq!(parse(&body).unwrap().duration_minutes, 180);
    }

    #[test]
    fn every_rule_is_enforced() {
        let cases = [
            (VALID.replace("course-42-session-7", ""), "booking_id"),
            (
                VALID.replace("course-42-session-7", &"x".repeat(65)),
                "booking_id",
            ),
            (VALID.replace("course-42-session-7", "a b"), "booking_id"),
            (
                VALID.replace("trainer@example.org", "not-an-address"),
                "email",
            ),
            (
                VALID.replace("trainer@example.org", "Bob <b@example.org>"),
                "email",
            ),
            (
                VALID.replace("trainer@example.org", "a@example.org\\r\\nBcc: x@y.z"),
                "email",
            ),
            (VALID.replace("+08:00", ""), "booking_time"),
            (VALID.replace("12,", "0,"), "number_of_users"),
            (VALID.replace("12,", "51,"), "number_of_users"),
            (VALID.replace("12,", "3.0,"), "number_of_users"),
            (VALID.replace("12,", r#""3","#), "number_of_users"),
            (VALID.replace("180", "14"), "duration_minutes"),
            (VALID.replace("180", "1441"), "duration_minutes"),
            (VALID.replace("2026-12-01", "2020-01-01"), "past"),
            ("[1,2]".to_string(), "object"),
            ("{not json".to_string(), "JSON"),
        ];
        for (body, needle) in cases {
            let err = parse(&body).expect_err(&body).0;
            assert!(err.contains(needle), "{err:?} should mention {needle}");
            assert!(err.len() <= 500);
        }
    }

    #[test]
    fn missing_fields_are_named() {
        for field in ["booking_id", "email", "booking_time", "number_of_users"] {
            let mut v: Value = serde_json::from_str(VALID).unwrap();
            v.as_object_mut().unwrap().remove(field);
            let err = parse(&v.to_string()).unwrap_err().0;
            assert_eq!(err, format!("{field} is required"));
        }
    }

    #[test]
    fn content_type_size_and_encoding_are_checked() {
        let rules = BookingRules::default();
        assert!(parse_booking(VALID.as_bytes(), None, &rules, now()).is_ok());
        assert!(
            parse_booking(
                VALID.as_bytes(),
                Some("application/json; charset=utf-8"),
                &rules,
                now()
            )
            .is_ok()
        );
        assert!(parse_booking(VALID.as_bytes(), Some("text/plain"), &rules, now()).is_err());
        let big = format!("{}{}", " ".repeat(MAX_BODY_BYTES), VALID);
        assert!(
            parse_booking(big.as_bytes(), None, &rules, now())
                .unwrap_err()
                .0
                .contains("bytes")
        );
        assert!(
            parse_booking(b"\xff\xfe", None, &rules, now())
                .unwrap_err()
                .0
                .contains("UTF-8")
        );
    }

    #[test]
    fn a_started_booking_that_has_not_ended_is_accepted() {
        let body = VALID.replace("2026-12-01T09:00:00+08:00", "2026-11-25T23:00:00Z");
        assert!(parse(&body).is_ok());
    }

    #[test]
    fn a_repeated_field_is_refused() {
        let body = VALID.replace(
            r#""number_of_users":12"#,
            r#""number_of_users":12,"number_of_users":3"#,
        );
        let err = parse(&body).unwrap_err().0;
        assert!(err.contains("appears twice"), "{err}");
    }

    #[test]
    fn huge_numbers_are_reported_as_sent() {
        let body = VALID.replace("12,", "18446744073709551615,");
        let err = parse(&body).unwrap_err().0;
        assert!(err.contains("got 18446744073709551615"), "{err}");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let body = VALID.replace("{", r#"{"colour":"blue","#);
        assert!(parse(&body).is_ok());
    }
}
