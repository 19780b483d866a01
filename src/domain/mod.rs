//! Domain types: values that cannot hold an invalid booking, credential or message.
//!
//! Everything that crosses a process edge is parsed here first (`booking`), so the stages work
//! only with types whose invariants already hold.

pub mod booking;
pub mod cost;
pub mod credentials;
pub mod events;
pub mod messages;

pub use booking::{
    Booking, BookingId, BookingMessage, BookingRules, Cancellation, EmailAddress, InvalidBooking,
    UserCount, parse_booking, parse_booking_content, parse_message, peek, peek_booking_id,
};
pub use cost::{Cost, Prices, Usage};
pub use credentials::{Credential, Password, Username};
pub use events::{Event, EventInstance, EventKind};
pub use messages::{BookingRef, EmailKind, NotifyMessage};
