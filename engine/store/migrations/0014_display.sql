-- What patients see when they browse (engine.model.Display): a department's
-- introduction (科室介绍), a doctor's expertise (擅长), where a session's
-- visits are (就诊地点). Names and titles were there already.
ALTER TABLE departments ADD COLUMN intro text;
ALTER TABLE doctors ADD COLUMN expertise text;
ALTER TABLE sessions ADD COLUMN location text;
