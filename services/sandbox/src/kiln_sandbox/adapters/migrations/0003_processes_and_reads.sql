-- Background processes of each build (bash with run_in_background) and the files each build has
-- read, for edit_file's read-before-edit check.
CREATE TABLE IF NOT EXISTS processes (
    build_id    text NOT NULL,
    process_id  text NOT NULL,           -- bash_1, bash_2, ... per build
    seq         integer NOT NULL,
    call_id     text NOT NULL,           -- the ToolCall that started it: one process per call
    iteration   integer NOT NULL,
    command     text NOT NULL,
    sandbox_id  text NOT NULL,           -- a process lives and dies with this sandbox
    pid         integer,                 -- leads its own session and process group there
    status      text NOT NULL CHECK (status IN ('starting', 'running', 'exited', 'killed',
                                                'stopped', 'lost')),
    exit_code   integer,
    reason      text NOT NULL DEFAULT '',
    read_offset bigint NOT NULL DEFAULT 0,   -- bytes of its output bash_output has shown
    ports       integer[] NOT NULL DEFAULT '{}',  -- where it listens (kept for previews)
    reported_by text,                    -- the call whose result told the model it had ended
    started_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    PRIMARY KEY (build_id, process_id),
    UNIQUE (build_id, call_id),
    UNIQUE (build_id, seq)
);
CREATE INDEX IF NOT EXISTS processes_live ON processes (build_id)
    WHERE status IN ('starting', 'running');
-- A file's content as the build last saw it (read_file) or made it (write_file, edit_file).
CREATE TABLE IF NOT EXISTS file_reads (
    build_id text NOT NULL,
    path     text NOT NULL,
    sha256   text NOT NULL,
    call_id  text NOT NULL,
    read_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (build_id, path)
);
-- Whether the build has ever started a background process: only such builds pay for the
-- processes' bookkeeping on each call.
ALTER TABLE sandboxes ADD COLUMN IF NOT EXISTS has_processes boolean NOT NULL DEFAULT false;
