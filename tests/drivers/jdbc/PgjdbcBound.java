// pgjdbc through pgward over TLS as a policy-bound service: DatabaseMetaData introspection (what
// JDBC tools and ORMs such as Hibernate read), prepared statements, typed results.
// Run by tests/it/catalog.rs as `java -cp <postgresql.jar> PgjdbcBound.java` with PGWARD_PORT,
// PGWARD_TOKEN, PGWARD_DATABASE and PGWARD_USER set; exits non-zero on the first failed check.
import java.sql.*;
import java.util.*;

public class PgjdbcBound {
    static void check(boolean ok, String what) {
        if (!ok) {
            System.err.println("FAILED: " + what);
            System.exit(1);
        }
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + System.getenv("PGWARD_PORT") + "/"
            + System.getenv("PGWARD_DATABASE") + "?sslmode=require";
        Properties p = new Properties();
        p.setProperty("user", System.getenv("PGWARD_USER"));
        p.setProperty("password", System.getenv("PGWARD_TOKEN"));
        try (Connection c = DriverManager.getConnection(url, p)) {
            DatabaseMetaData md = c.getMetaData();
            List<String> tables = new ArrayList<>();
            try (ResultSet rs = md.getTables(null, "public", "%", new String[] {"TABLE"})) {
                while (rs.next()) tables.add(rs.getString("TABLE_NAME"));
            }
            check(tables.equals(List.of("customers", "invoices")), "tables " + tables);
            List<String> cols = new ArrayList<>();
            try (ResultSet rs = md.getColumns(null, "public", "customers", "%")) {
                while (rs.next()) cols.add(rs.getString("COLUMN_NAME"));
            }
            check(cols.contains("name") && cols.contains("tenant_id"), "columns " + cols);
            try (ResultSet rs = md.getPrimaryKeys(null, "public", "customers")) {
                check(rs.next() && rs.getString("COLUMN_NAME").equals("id"), "primary key");
            }
            try (PreparedStatement ps = c.prepareStatement(
                    "SELECT id, name, created_at FROM customers WHERE id > ? ORDER BY id")) {
                ps.setLong(1, 0);
                int n = 0;
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        rs.getTimestamp(3);
                        n++;
                    }
                }
                check(n == 5, "rows " + n);
            }
        }
        System.out.println("all checks passed");
    }
}
