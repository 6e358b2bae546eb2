//! Runs SQL against a database with SQLite 3.31.1, printing result rows as `a|b|c`.
//! Usage: sqlite-3-31 DB SQL. Exit status 1 with the error message on failure.
//! Used by the black-box tests to show that a file marmot manages still opens, and its
//! triggers still work, in an application linked against an old SQLite.

use libsqlite3_sys as ffi;
use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_void};

unsafe extern "C" fn print_row(_: *mut c_void, n: c_int, values: *mut *mut c_char, _: *mut *mut c_char) -> c_int {
    let mut cols = Vec::new();
    for i in 0..n as isize {
        // SAFETY: SQLite passes n column values, each NULL or a NUL-terminated string.
        let v = unsafe { *values.offset(i) };
        cols.push(if v.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(v) }.to_string_lossy().into_owned()
        });
    }
    println!("{}", cols.join("|"));
    0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (db, sql) = (CString::new(args[1].clone()).unwrap(), CString::new(args[2].clone()).unwrap());
    unsafe {
        let mut conn = std::ptr::null_mut();
        if ffi::sqlite3_open_v2(db.as_ptr(), &mut conn, ffi::SQLITE_OPEN_READWRITE, std::ptr::null()) != 0 {
            eprintln!("open failed");
            std::process::exit(1);
        }
        ffi::sqlite3_busy_timeout(conn, 10_000);
        let mut err: *mut c_char = std::ptr::null_mut();
        if ffi::sqlite3_exec(conn, sql.as_ptr(), Some(print_row), std::ptr::null_mut(), &mut err) != 0 {
            eprintln!("{}", CStr::from_ptr(err).to_string_lossy());
            std::process::exit(1);
        }
        ffi::sqlite3_close(conn);
    }
}
