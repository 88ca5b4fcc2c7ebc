//! The config file (`--config FILE`): a TOML table whose keys are the long flags, with `_`
//! for `-`, and whose values become those flags' defaults.
//!
//! Layering is clap's own: a flag's value comes from the command line, else from its
//! environment variable, else from its default. Making each key of the file the default of
//! its flag puts the file between the environment and the built-in defaults, with no second
//! list of settings to keep in step and no merge to write: the keys are looked up among the
//! command's own arguments (an unknown key is an error naming it), and a file value goes
//! through the same parser as the flag's, checked here so that a bad one is reported with
//! the file and the key.

use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue};
use clap::{Arg, ArgAction, Command};
use toml::Value;

/// Errors reading the config file.
#[derive(thiserror::Error, Debug)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read config file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not TOML.
    #[error("config file {0} is not valid TOML")]
    Toml(PathBuf, #[source] Box<toml::de::Error>),
    /// A key that is no setting.
    #[error("config file {path}: unknown key '{key}'{hint}")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// A suggestion, if there is one.
        hint: String,
    },
    /// A setting with a bad value.
    #[error("config file {path}: bad value for '{key}': {why}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong with it.
        why: String,
    },
}

/// `cmd` with the settings of the TOML file at `path` as its arguments' defaults.
pub fn layer(cmd: Command, path: &Path) -> Result<Command, FileError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError::Read(path.to_owned(), e))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| FileError::Toml(path.to_owned(), Box::new(e)))?;
    let mut defaults = Vec::with_capacity(table.len());
    for (key, value) in &table {
        let arg = setting(&cmd, key).ok_or_else(|| FileError::UnknownKey {
            path: path.to_owned(),
            key: key.clone(),
            hint: hint(&cmd, key),
        })?;
        let values = arg_values(arg, value).map_err(|why| FileError::Value {
            path: path.to_owned(),
            key: key.clone(),
            why,
        })?;
        defaults.push((key.clone(), values));
    }
    Ok(defaults.into_iter().fold(cmd, |cmd, (key, values)| {
        cmd.mut_arg(key, |a| a.default_values(values))
    }))
}

/// The argument a file key sets: any long flag but `--config`, `--help` and `--version`.
fn setting<'a>(cmd: &'a Command, key: &str) -> Option<&'a Arg> {
    cmd.get_arguments().find(|a| {
        a.get_id() == key
            && a.get_long().is_some()
            && key != "config"
            && !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
    })
}

fn hint(cmd: &Command, key: &str) -> String {
    let snake = key.replace('-', "_");
    if setting(cmd, &snake).is_some() {
        format!(" (did you mean '{snake}'? keys use _ where flags use -)")
    } else {
        " (the keys are the long flags without --, with _ for -; see --help)".to_owned()
    }
}

/// The file's value as the strings `arg` would get on the command line, checked by `arg`'s
/// own parser.
fn arg_values(arg: &Arg, value: &Value) -> Result<Vec<String>, String> {
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        return match value {
            Value::Boolean(b) => Ok(vec![b.to_string()]),
            _ => Err("expected true or false".to_owned()),
        };
    }
    let many = matches!(arg.get_action(), ArgAction::Append);
    let values = match value {
        Value::Array(items) if many => items.iter().map(scalar).collect::<Result<_, _>>()?,
        Value::Array(_) => return Err("expected one value, not a list".to_owned()),
        v => vec![scalar(v)?],
    };
    // Split as clap splits a flag's value, so that the defaults are single values.
    let values: Vec<String> = match arg.get_value_delimiter() {
        Some(d) => values
            .iter()
            .flat_map(|v| v.split(d).map(str::to_owned))
            .collect(),
        None => values,
    };
    check(arg, &values)?;
    Ok(values)
}

fn scalar(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Boolean(b) => Ok(b.to_string()),
        Value::Datetime(_) | Value::Array(_) | Value::Table(_) => Err(format!(
            "expected a string or a number, got {}",
            v.type_str()
        )),
    }
}

/// Parses `values` with a command made of `arg` alone: the file's values meet the same
/// parser as the command line's.
fn check(arg: &Arg, values: &[String]) -> Result<(), String> {
    let long = arg.get_long().expect("file settings have a long flag");
    Command::new("config-file")
        .no_binary_name(true)
        .arg(arg.clone())
        .try_get_matches_from(values.iter().map(|v| format!("--{long}={v}")))
        .map(drop)
        .map_err(|e| reason(&e))
}

/// What a value parser said, without clap's framing (which names the flag, not the key).
fn reason(e: &clap::Error) -> String {
    if let Some(source) = std::error::Error::source(e) {
        return source.to_string();
    }
    let invalid = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => format!("'{v}'"),
        _ => "the value".to_owned(),
    };
    match e.get(ContextKind::ValidValue) {
        Some(ContextValue::Strings(valid)) => {
            format!("{invalid} is not one of {}", valid.join(", "))
        }
        _ => e.kind().to_string(),
    }
}
