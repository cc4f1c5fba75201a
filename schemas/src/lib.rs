//! The records chorus exchanges on its topics: Rust types for the inputs channels send
//! (events, message requests, consent changes), their validation with precise messages,
//! and the Avro schemas (`schemas/avro/*.avsc`) with a codec that maps any topic's JSON
//! record to and from Avro single-object encoding.

mod avro;
mod event;
mod inputs;
mod validate;

pub use avro::{decode_avro, encode_avro, schema_for_topic, AvroError, AVRO_MAGIC};
pub use event::{Event, EventContext};
pub use inputs::{ConsentChange, MessageRequest};
pub use validate::{kind_of, parse_timestamp_ms, ValidationError};
