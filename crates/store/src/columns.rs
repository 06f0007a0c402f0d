//! Enums stored in `text` columns. The column values are the ones the migrations' CHECK
//! constraints name, so no data migration was needed when the Rust side stopped using strings.
//!
//! `sqlx::Type` is implemented by hand, delegating to `str`, rather than derived: a derived
//! enum with `type_name = "text"` declares its type by name, and sqlx then looks its OID up
//! (`SELECT $1::regtype::oid`) once per connection; delegating keeps the built-in `text` OID.

use notify_types::Channel;

/// Implements `sqlx::Type`, `Encode` and `Decode` for Postgres for a type stored as text:
/// `to` gives its column value, `from` reads one back (`None`: not a value we write).
macro_rules! text_column {
    ($ty:ty, to: $to:expr, from: $from:expr) => {
        impl sqlx::Type<sqlx::Postgres> for $ty {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                let to: fn(&$ty) -> &'static str = $to;
                <&str as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&to(self), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $ty {
            fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                let from: fn(&str) -> Option<$ty> = $from;
                let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                from(text).ok_or_else(|| format!("unexpected {} {text:?} in the database", stringify!($ty)).into())
            }
        }
    };
}
pub(crate) use text_column;

/// A [`Channel`] as the store reads and writes it (`email`, `webhook`, `in_app`).
///
/// A wrapper rather than an optional `sqlx` feature on notify-types: the orphan rule forbids
/// implementing sqlx's traits for `Channel` here, and the types crate is meant to stay free of
/// database code (serde, uuid, chrono only) for every crate that uses it. How a channel is
/// spelled in a column is the store's business, next to the migrations that spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChannelColumn(pub(crate) Channel);

text_column!(ChannelColumn, to: |c| c.0.as_str(), from: |s| {
    Channel::ALL.into_iter().find(|c| c.as_str() == s).map(ChannelColumn)
});
