//! The helper SQL schema (`sql/mikkoo.sql`), embedded so `mikkoo sql | psql` installs it
//! from the binary alone.

/// The full helper schema.
pub const MIKKOO_SQL: &str = include_str!("../sql/mikkoo.sql");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_carries_the_relays_dead_letter_table() {
        assert!(
            MIKKOO_SQL.contains(crate::deadletter::DEAD_LETTER_DDL.trim()),
            "sql/mikkoo.sql must contain sql/dead_letter.sql verbatim"
        );
    }

    #[test]
    fn the_schema_takes_the_relays_ddl_lock() {
        let lock = format!("pg_advisory_xact_lock({})", crate::deadletter::DDL_LOCK_KEY);
        assert!(MIKKOO_SQL.contains(&lock), "sql/mikkoo.sql must take {lock}");
    }
}
