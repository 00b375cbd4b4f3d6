from builder.cli import main_entry

main_entry()
