//! `--set key.path=value` overrides, applied to the parsed TOML before it is typed.

use super::ConfigError;

/// Sets `spec` (`a.b.c=value`) in `table`. The value is read as a TOML value (`4`, `1e-3`,
/// `true`, `[1, 2]`, `"text"`); anything that is not valid TOML is taken as a plain string.
pub fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), ConfigError> {
    let err = |message: &str| ConfigError::Override { spec: spec.to_string(), message: message.into() };
    let (path, raw) = spec.split_once('=').ok_or_else(|| err("expected key.path=value"))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(err("the key path has an empty part"));
    }
    let value = parse_value(raw.trim())
        .ok_or_else(|| err("the value must be one TOML value (a second line or key is not part of it)"))?;
    let (last, parents) = keys.split_last().ok_or_else(|| err("empty key path"))?;
    let mut node = table;
    for key in parents {
        let entry = node.entry(key.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().ok_or_else(|| err(&format!("`{key}` is a value, not a section")))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

/// The value `raw` as TOML reads the right-hand side of an assignment (so TOML decides the
/// type); text that is no TOML value is taken as a plain string. `None` when `raw` smuggles in
/// more than one value (`3\ntrain.lr=2`).
fn parse_value(raw: &str) -> Option<toml::Value> {
    if raw.contains(['\n', '\r']) {
        return None;
    }
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) if t.len() == 1 => t.remove("v"),
        Ok(_) => None,
        Err(_) => Some(toml::Value::String(raw.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_values_and_new_sections() {
        let mut t = toml::Table::new();
        apply_override(&mut t, "train.workers=4").unwrap();
        apply_override(&mut t, "train.lr=1e-3").unwrap();
        apply_override(&mut t, "job.name=demo").unwrap();
        apply_override(&mut t, "job.entrypoint=[\"python\", \"x.py\"]").unwrap();
        assert_eq!(t["train"]["workers"].as_integer(), Some(4));
        assert_eq!(t["train"]["lr"].as_float(), Some(1e-3));
        assert_eq!(t["job"]["name"].as_str(), Some("demo"));
        assert_eq!(t["job"]["entrypoint"].as_array().map(|a| a.len()), Some(2));
    }

    #[test]
    fn malformed_specs_are_refused() {
        let mut t = toml::Table::new();
        assert!(apply_override(&mut t, "train.workers").is_err());
        assert!(apply_override(&mut t, "train..workers=1").is_err());
        apply_override(&mut t, "x=1").unwrap();
        assert!(apply_override(&mut t, "x.y=1").is_err());
        // One value per --set: a smuggled second line or key is refused, not dropped.
        assert!(apply_override(&mut t, "train.steps=3\ntrain.lr=2").is_err());
    }
}
