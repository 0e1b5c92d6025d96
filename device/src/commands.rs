//! execute_command (being written).
