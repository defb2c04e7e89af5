-- Each turn's iteration (the build's iteration when it was recorded), so that a fork at iteration
-- N can take the turns of iterations <= N. NULL on turns recorded before this column existed.
ALTER TABLE turns ADD COLUMN IF NOT EXISTS iteration integer;
