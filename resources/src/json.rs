//! JSON objects decoded with errors a person reads: which field is wrong, in JSON's words
//! (`vcpus: expected a number, found string "two"`) rather than Rust's (`expected u32`).

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Decodes `fields` as a `T`. On error, each field is tried alone: the first whose own error
/// is not a missing field is the one named.
pub fn decode_object<T: DeserializeOwned>(fields: Map<String, Value>) -> Result<T, String> {
    let whole = match serde_json::from_value(Value::Object(fields.clone())) {
        Ok(decoded) => return Ok(decoded),
        Err(e) => e.to_string(),
    };
    let named = fields.iter().find_map(|(name, field)| {
        let alone = Map::from_iter([(name.clone(), field.clone())]);
        let error = serde_json::from_value::<T>(Value::Object(alone)).err()?;
        let error = error.to_string();
        (!error.starts_with("missing field")).then(|| format!("{name}: {}", in_words(&error)))
    });
    Err(named.unwrap_or_else(|| in_words(&whole)))
}

/// What a JSON value is, for a message.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde's message with the Rust types it names put in JSON's words.
fn in_words(message: &str) -> String {
    let Some(rest) = message.strip_prefix("invalid type: ") else {
        return message.to_string();
    };
    let Some((found, expected)) = rest.split_once(", expected ") else {
        return message.to_string();
    };
    let expected = match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64" => "a number",
        "a sequence" => "a list",
        other if other.starts_with("struct ") => "an object",
        other => other,
    };
    let found = match found {
        "map" => "an object",
        "sequence" => "a list",
        other => other,
    };
    format!("expected {expected}, found {found}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)] // Decoded only to see what is refused.
    struct Body {
        vm_id: String,
        count: u32,
        flag: Option<bool>,
    }

    fn refused(text: &str) -> String {
        let Value::Object(fields) = serde_json::from_str(text).unwrap() else {
            panic!("{text} is not an object");
        };
        decode_object::<Body>(fields).unwrap_err()
    }

    #[test]
    fn the_wrong_field_is_named_in_json_words() {
        assert_eq!(
            refused(r#"{"vm_id": "a", "count": "two"}"#),
            "count: expected a number, found string \"two\""
        );
        assert_eq!(
            refused(r#"{"flag": 1, "vm_id": "a", "count": 2}"#),
            "flag: expected a boolean, found integer `1`"
        );
        assert_eq!(refused(r#"{"vm_id": "a"}"#), "missing field `count`");
    }
}
