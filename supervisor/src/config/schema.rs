//! The JSON schema of the configuration file, generated from the types in `file.rs`; the copy
//! checked in at docs/kmirror.schema.json is kept current by a test.

/// The schema as pretty-printed JSON, with a trailing newline.
pub fn json() -> String {
    let schema = schemars::schema_for!(super::file::FileConfig);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const CHECKED_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/kmirror.schema.json");

    /// docs/kmirror.schema.json is what the types generate. Run with KMIRROR_UPDATE_SCHEMA=1 to
    /// rewrite it after changing them.
    #[test]
    fn the_checked_in_schema_is_current() {
        let current = json();
        if std::env::var_os("KMIRROR_UPDATE_SCHEMA").is_some() {
            std::fs::write(CHECKED_IN, &current).unwrap();
        }
        let checked_in = std::fs::read_to_string(CHECKED_IN).unwrap_or_default();
        assert!(
            checked_in == current,
            "docs/kmirror.schema.json is stale: run `KMIRROR_UPDATE_SCHEMA=1 cargo test -p kmirror schema` and commit it"
        );
    }

    /// Follows `$ref`s and the alternatives of untagged enums to every object schema, by dotted
    /// path, collecting the property names each allows.
    fn objects(
        root: &serde_json::Value,
        at: &serde_json::Value,
        path: &str,
        out: &mut Vec<(String, BTreeSet<String>)>,
    ) {
        if let Some(reference) = at.get("$ref").and_then(|r| r.as_str()) {
            let name = reference.trim_start_matches("#/$defs/");
            return objects(root, &root["$defs"][name], path, out);
        }
        for alternatives in ["anyOf", "oneOf"] {
            if let Some(list) = at.get(alternatives).and_then(|l| l.as_array()) {
                for alt in list {
                    objects(root, alt, path, out);
                }
            }
        }
        if let Some(props) = at.get("properties").and_then(|p| p.as_object()) {
            out.push((path.to_string(), props.keys().cloned().collect()));
            for (key, sub) in props {
                let sub_path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                objects(root, sub, &sub_path, out);
            }
        }
    }

    /// The reader accepts exactly the keys the schema declares, table by table (tables whose
    /// values are free-form maps, like `agent.labels`, have no properties in either).
    #[test]
    fn the_reader_accepts_exactly_the_schemas_keys() {
        let root: serde_json::Value = serde_json::from_str(&json()).unwrap();
        let mut found = Vec::new();
        objects(&root, &root, "", &mut found);
        let mut seen = BTreeSet::new();
        for (path, keys) in &found {
            let read: BTreeSet<String> = super::super::read::KEYS
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, k)| k.iter().map(|s| s.to_string()).collect())
                .unwrap_or_else(|| panic!("the reader has no key list for `{path}`"));
            assert_eq!(&read, keys, "keys of `{path}`");
            seen.insert(path.clone());
        }
        for (path, _) in super::super::read::KEYS {
            assert!(seen.contains(*path), "`{path}` is read but not in the schema");
        }
    }
}
