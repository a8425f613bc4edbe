//! `${VAR}` and `${VAR:-default}` expansion in configuration strings.
//!
//! Expansion runs over every string value of the parsed tree before anything reads it,
//! so secrets can come from the environment anywhere. `$${` writes a literal `${`. A bare
//! `$` is left alone (passwords often contain one). As in the shell, `${VAR:-default}`
//! uses the default when `VAR` is unset or empty. A variable that is not set and has no
//! default is an error naming it and the key path; the value itself is never echoed.

use serde_json::Value;

use super::reader::{Diagnostics, join};

/// Expands variables in every string of `value`, in place, looking them up with `lookup`.
pub(crate) fn expand_tree(
    value: &mut Value,
    path: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    diag: &mut Diagnostics,
) {
    match value {
        Value::String(text) => {
            if text.contains('$') {
                match expand(text, lookup) {
                    Ok(expanded) => *text = expanded,
                    Err(message) => diag.error(path, message),
                }
            }
        }
        Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                expand_tree(item, &format!("{path}[{index}]"), lookup, diag);
            }
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                expand_tree(item, &join(path, key), lookup, diag);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Expands one string.
pub(crate) fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(escaped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = escaped;
        } else if let Some(reference) = after.strip_prefix("${") {
            let end = reference
                .find('}')
                .ok_or_else(|| "unterminated ${ in value (write $${ for a literal ${)".to_owned())?;
            out.push_str(&resolve(&reference[..end], lookup)?);
            rest = &reference[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn resolve(reference: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let (name, default) = match reference.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (reference, None),
    };
    let valid_name = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !valid_name {
        return Err(format!("invalid variable reference ${{{name}}}"));
    }
    // As in the shell: `:-` falls back when the variable is unset *or* empty, so an
    // exported-but-blank variable (a common CI mistake) does not blank the setting.
    match (lookup(name), default) {
        (Some(value), Some(default)) if value.is_empty() => Ok(default.to_owned()),
        (Some(value), _) => Ok(value),
        (None, Some(default)) => Ok(default.to_owned()),
        (None, None) => Err(format!(
            "environment variable {name} is not set (referenced as ${{{name}}}; use ${{{name}:-default}} for a fallback)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PASSWORD" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_and_defaults() {
        assert_eq!(
            expand("amqp://u:${PASSWORD}@h", &env).unwrap(),
            "amqp://u:s3cret@h"
        );
        assert_eq!(expand("${MISSING:-5672}", &env).unwrap(), "5672");
        assert_eq!(
            expand("${EMPTY:-x}", &env).unwrap(),
            "x",
            "empty takes the default, as in the shell"
        );
        assert_eq!(
            expand("${EMPTY}", &env).unwrap(),
            "",
            "empty without a default is empty"
        );
        assert_eq!(expand("${PASSWORD}${PASSWORD}", &env).unwrap(), "s3crets3cret");
    }

    #[test]
    fn leaves_bare_dollars_and_unescapes() {
        assert_eq!(expand("pa$$word$", &env).unwrap(), "pa$$word$");
        assert_eq!(
            expand("literal $${PASSWORD}", &env).unwrap(),
            "literal ${PASSWORD}"
        );
    }

    #[test]
    fn missing_variables_are_named() {
        let error = expand("${NOPE}", &env).unwrap_err();
        assert!(error.contains("NOPE is not set"), "{error}");
        assert!(
            expand("${unterminated", &env)
                .unwrap_err()
                .contains("unterminated")
        );
        assert!(expand("${1BAD}", &env).unwrap_err().contains("invalid variable"));
    }

    #[test]
    fn tree_errors_carry_the_key_path() {
        let mut value = serde_json::json!({"Application": {"workers": {"q": {"postgres_url": "${NOPE}"}}}});
        let mut diag = Diagnostics::default();
        expand_tree(&mut value, "", &env, &mut diag);
        assert_eq!(diag.errors.len(), 1);
        assert!(
            diag.errors[0]
                .to_string()
                .starts_with("Application.workers.q.postgres_url: environment variable NOPE"),
            "{}",
            diag.errors[0]
        );
    }
}
