//! JSON Schema checks of what luvmm prints and serves, against the documents in the
//! repository (`vmm/api/openapi.json`, `liveupdate/agent-protocol.schema.json`,
//! `vmm/cli/reports.schema.json`).

use std::path::Path;

use serde_json::{json, Value};

/// A document of the repository, by its path from the top.
pub fn document(relative: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// A validator for the schema at `pointer` of `doc`, its `$ref`s resolved within `doc`.
pub fn validator(doc: &Value, pointer: &str) -> jsonschema::Validator {
    let mut root = doc.clone();
    root["$ref"] = json!(format!("#{pointer}"));
    root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("{pointer}: {e}"))
}

/// Fails, naming every error, unless `instance` is valid against the schema at `pointer`.
pub fn assert_valid(doc: &Value, pointer: &str, instance: &Value, what: &str) {
    let errors: Vec<String> = validator(doc, pointer)
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: {instance} against {pointer}: {errors:#?}"
    );
}

/// `instance` against report `name` of `vmm/cli/reports.schema.json`.
pub fn assert_report(name: &str, instance: &Value) {
    let doc = document("vmm/cli/reports.schema.json");
    assert_valid(&doc, &format!("/$defs/{name}"), instance, name);
}
