/** The library name and version every message carries in `context.library`. */
export const LIBRARY_NAME = 'chorus-web';
/** Kept equal to package.json's "version" (a unit test checks it). */
export const VERSION = '0.1.0';
