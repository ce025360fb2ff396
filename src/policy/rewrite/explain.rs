//! EXPLAIN for policy-bound services. `ANALYZE` runs the statement and prints what it counted
//! ("Rows Removed by Filter" is the exact number of other tenants' rows; a primary-key lookup
//! shows whether another tenant's row with that key exists), and plain EXPLAIN's costs and row
//! estimates follow statistics gathered over the whole table. So a bound service gets only the
//! plan's shape: `ANALYZE` (any spelling) and the options that report execution or statistics
//! are refused, and every EXPLAIN is forwarded as `EXPLAIN (…, COSTS OFF)`.
use sqlparser::ast::{AnalyzeFormatKind, Ident, UtilityOption, Value};

use super::*;

/// Options a bound service may pass; anything else (ANALYZE, BUFFERS, TIMING, SUMMARY, WAL,
/// SETTINGS, MEMORY, SERIALIZE, options of later server versions) is refused.
const ALLOWED_OPTIONS: &[&str] = &["format", "verbose", "costs", "generic_plan"];

impl Rewriter<'_> {
    /// Checks an EXPLAIN's options and rewrites it to the costless form; the explained
    /// statement itself is rewritten by the caller.
    pub(super) fn explain_options(
        &self,
        analyze: &mut bool,
        verbose: &mut bool,
        format: &mut Option<AnalyzeFormatKind>,
        options: &mut Option<Vec<UtilityOption>>,
        query_plan: bool,
        estimate: bool,
    ) -> R<()> {
        if *analyze || option_named(options, "analyze") || option_named(options, "analyse") {
            return Err(self.refuse(
                "EXPLAIN ANALYZE: it runs the statement and counts the rows the policy hides",
            ));
        }
        if query_plan || estimate {
            return Err(self.refuse("this EXPLAIN form"));
        }
        let mut kept = Vec::new();
        if *verbose {
            kept.push(UtilityOption {
                name: Ident::new("VERBOSE"),
                arg: None,
            });
        }
        if let Some(f) = format.take() {
            let kind = match f {
                AnalyzeFormatKind::Keyword(k) | AnalyzeFormatKind::Assignment(k) => k.to_string(),
            };
            kept.push(UtilityOption {
                name: Ident::new("FORMAT"),
                arg: Some(Expr::Identifier(Ident::new(kind))),
            });
        }
        for option in options.take().unwrap_or_default() {
            let name = option.name.value.to_ascii_lowercase();
            if !ALLOWED_OPTIONS.contains(&name.as_str()) {
                return Err(self.refuse(format!(
                    "EXPLAIN with option {}: only FORMAT, VERBOSE and GENERIC_PLAN are allowed (costs and counts follow the rows the policy hides)",
                    name.to_ascii_uppercase()
                )));
            }
            if name == "costs" {
                if option.arg.as_ref().and_then(boolean_arg) != Some(false) {
                    return Err(self.refuse(
                        "EXPLAIN with COSTS: costs and row estimates follow the rows the policy hides",
                    ));
                }
                continue;
            }
            kept.push(option);
        }
        kept.push(UtilityOption {
            name: Ident::new("COSTS"),
            arg: Some(Expr::Value(Value::Boolean(false).into())),
        });
        *verbose = false;
        *options = Some(kept);
        Ok(())
    }
}

fn option_named(options: &Option<Vec<UtilityOption>>, name: &str) -> bool {
    options
        .iter()
        .flatten()
        .any(|o| o.name.value.eq_ignore_ascii_case(name))
}

/// The value of a boolean option as PostgreSQL reads it (`defGetBoolean`), where it is plainly
/// one; `None` for anything else.
fn boolean_arg(arg: &Expr) -> Option<bool> {
    let word = match arg {
        Expr::Value(v) => match &v.value {
            Value::Boolean(b) => return Some(*b),
            Value::Number(n, _) => n.clone(),
            Value::SingleQuotedString(s) => s.clone(),
            _ => return None,
        },
        Expr::Identifier(id) => id.value.clone(),
        _ => return None,
    };
    match word.to_ascii_lowercase().as_str() {
        "false" | "off" | "no" | "0" => Some(false),
        "true" | "on" | "yes" | "1" => Some(true),
        _ => None,
    }
}
