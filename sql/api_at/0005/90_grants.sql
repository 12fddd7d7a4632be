-- EXECUTE rights of every function of this set, read from the function's own marker
-- `SET themis.execute = 'role1,role2'` (or 'none': the owner only).  The marker is the one
-- place a function's grantees are written, so signatures are never copied into grant lists;
-- it also tells the migrations which functions belong to the set (they drop exactly these).
DO $$
DECLARE
    f record;
    grantee text;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure AS sig, substr(c, length('themis.execute=') + 1) AS grantees
          FROM pg_proc p, unnest(p.proconfig) AS c
         WHERE c LIKE 'themis.execute=%'
           AND p.pronamespace IN ('themis'::regnamespace, 'public'::regnamespace)
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.sig);
        FOREACH grantee IN ARRAY string_to_array(f.grantees, ',') LOOP
            grantee := btrim(grantee);
            CONTINUE WHEN grantee IN ('', 'none');
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f.sig, grantee);
        END LOOP;
    END LOOP;
END
$$;
